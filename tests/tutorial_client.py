# ruff: noqa  -- kept as the tutorial wrote it
"""The classic tutorial's chat client, as people have it (blocking input(),
messages shown only after Enter).  Kept here to prove chatd stays compatible.

Usage: python tutorial_client.py PORT  (the name and messages come on stdin)
"""

import errno
import socket
import sys

HEADER_LENGTH = 10
IP = "127.0.0.1"
PORT = int(sys.argv[1])

my_username = input("Username: ")
client_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
client_socket.connect((IP, PORT))
client_socket.setblocking(False)
username = my_username.encode("utf-8")
username_header = f"{len(username):<{HEADER_LENGTH}}".encode("utf-8")
client_socket.send(username_header + username)

while True:
    try:
        message = input(f"{my_username} > ")
    except EOFError:
        sys.exit(0)
    if message:
        message = message.encode("utf-8")
        message_header = f"{len(message):<{HEADER_LENGTH}}".encode("utf-8")
        client_socket.send(message_header + message)
    try:
        while True:
            username_header = client_socket.recv(HEADER_LENGTH)
            if not len(username_header):
                print("Connection closed by the server")
                sys.exit()
            username_length = int(username_header.decode("utf-8").strip())
            username = client_socket.recv(username_length).decode("utf-8")
            message_header = client_socket.recv(HEADER_LENGTH)
            message_length = int(message_header.decode("utf-8").strip())
            message = client_socket.recv(message_length).decode("utf-8")
            print(f"{username} > {message}")
    except OSError as e:
        if e.errno != errno.EAGAIN and e.errno != errno.EWOULDBLOCK:
            print(f"Reading error: {e}")
            sys.exit()
        continue
