"""What both ends of chatd agree on: framing, chat conventions, notices, the control protocol.

Standard library only, and nothing else of chatd: the daemon, `chat` and `chatctl` all
build on it, so a change here is a change of the protocol.
"""
