"""`main` of the `chat` command: options, then pipe or terminal mode.

With a terminal on stdin and stdout it is interactive (client/tty.py); otherwise a
pipe (client/pipe.py).  One asyncio loop runs the session and the input side.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys

from chatd import __version__
from chatd.client.pipe import BURST_SECONDS, DEFAULT_RATE, PipeUI, pipe_mode
from chatd.client.render import safe
from chatd.client.session import INTERRUPTED, Ended, Session
from chatd.client.tty import TerminalUI, interactive_mode
from chatd.wire import framing
from chatd.wire.chat import DEFAULT_PORT

EPILOG = """\
commands (handled by the daemon): /who, /msg NAME TEXT, /me ACTION, /history [N], /help,
/quit;
//TEXT sends the message /TEXT.

exit status: 0 done, 1 the daemon did not confirm it took every message,
2 usage error, 3 unknown host, 4 cannot connect, 5 name rejected,
6 kicked or banned, 7 disconnected by the server, 8 connection lost,
130 interrupted.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat",
        description="Chat on a chatd server. Interactive when stdin and stdout are a terminal;\n"
        "otherwise each stdin line is sent and each incoming message printed as one line.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("host", metavar="HOST", help="the chatd server's host name or address")
    p.add_argument(
        "-u",
        "--user",
        metavar="NAME",
        help="your name in the chat (default: your login name)",
    )
    p.add_argument(
        "-p",
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"the server's port (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--header-length",
        type=header_length,
        default=framing.DEFAULT_HEADER_LENGTH,
        metavar="N",
        help="bytes in a frame header, as the server's header_length "
        f"(default: {framing.DEFAULT_HEADER_LENGTH})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print each incoming message as one JSON object per line "
        "(time, type, from, text); implies line mode even on a terminal",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="when the connection fails or drops, retry with backoff (1 s doubling to 30 s)",
    )
    p.add_argument(
        "--rate",
        type=rate,
        default=DEFAULT_RATE,
        metavar="N",
        help="in line mode, send at most N messages a second after a first "
        f"{BURST_SECONDS:g} seconds' worth, to stay under the server's flood limit "
        f"(default: {DEFAULT_RATE:g}, as the server's default; 0: no limit)",
    )
    p.add_argument("--version", action="version", version=f"chat {__version__}")
    return p


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"expected a number of messages a second, got {text!r}")
    return value


def header_length(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 20:
        raise argparse.ArgumentTypeError(f"expected an integer 1-20, got {text!r}")
    return int(text)


def default_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


async def _main(args: argparse.Namespace, interactive: bool) -> Ended:
    ui: TerminalUI | PipeUI = TerminalUI() if interactive else PipeUI(args.json)
    chat = Session(
        args.host,
        args.port,
        args.user,
        ui,
        header_length=args.header_length,
        reconnect=args.reconnect,
    )
    if isinstance(ui, TerminalUI):
        return await interactive_mode(chat, ui)
    return await pipe_mode(chat, ui, args.rate)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.user is None:
        args.user = default_name()
        if not args.user:
            p.error("no login name to use: give one with -u NAME")
    if len(args.user.encode()) > framing.max_length(args.header_length):
        p.error(f"the name does not fit a {args.header_length}-byte header")
    interactive = not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    try:
        end = asyncio.run(_main(args, interactive))
    except KeyboardInterrupt:
        return INTERRUPTED
    if end.message:
        print(f"chat: {safe(end.message)}", file=sys.stderr)  # it quotes the daemon
    return end.status
