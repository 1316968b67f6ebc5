"""`main` of the `chatd` command: options, the config, then the server in the foreground
or as a daemon."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from chatd import __version__
from chatd.server import config, reexec, systemd
from chatd.server.errors import StartupError
from chatd.server.handover import Inherited
from chatd.server.server import Server
from chatd.wire import notices


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatd",
        description="LAN group-chat daemon: what one client sends, every other client gets.",
    )
    p.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help=f"YAML config file (default: {config.DEFAULT_PATH}; "
        "built-in defaults when that file does not exist)",
    )
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config, print the result and exit (0 valid, 2 invalid)",
    )
    p.add_argument(
        "--daemon",
        action="store_true",
        help="detach into the background, logging to log.file (for systems without systemd; "
        "under systemd run in the foreground)",
    )
    p.add_argument(
        "--pidfile",
        metavar="PATH",
        default=None,
        help="with --daemon: pidfile, locked while chatd runs and removed at exit "
        "(default: /run/chatd.pid)",
    )
    p.add_argument(
        "--user",
        metavar="USER",
        help="with --daemon, started as root: serve as USER once the sockets are bound "
        "(overrides daemon.user)",
    )
    p.add_argument(
        "--group",
        metavar="GROUP",
        help="with --user: serve as GROUP, not USER's own (overrides daemon.group)",
    )
    p.add_argument(
        "--allow-root",
        action="store_true",
        help="with --daemon, started as root: serve as root all the same",
    )
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        help="serve the admin control socket at PATH (overrides control.socket)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help="listen on HOST:PORT instead of the config's listen (repeatable; kept over "
        "reloads); [V6]:PORT for IPv6",
    )
    p.add_argument(
        "--state-file",
        metavar="PATH",
        help="keep bans in PATH (overrides state_file)",
    )
    p.add_argument(
        "--history-file",
        metavar="PATH",
        help='keep the history in the SQLite database PATH ("" for memory only; '
        "overrides history.file)",
    )
    p.add_argument("--version", action="version", version=f"chatd {__version__}")
    return p


def load_config(path: str | None) -> tuple[config.Config, str | None]:
    """Return the config and the path it came from (None for the built-in defaults)."""
    if path is not None:
        return config.load(path), path
    if config.DEFAULT_PATH.exists():
        return config.load(config.DEFAULT_PATH), str(config.DEFAULT_PATH)
    return config.defaults(), None


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given on the command line, as dotted keys (paths made absolute)."""
    given = {"control.socket": args.control_socket, "state_file": args.state_file}
    paths = {key: os.path.abspath(value) for key, value in given.items() if value}
    named = {"daemon.user": args.user, "daemon.group": args.group}
    if args.history_file is not None:
        paths["history.file"] = args.history_file and os.path.abspath(args.history_file)
    return {
        **paths,
        **({"listen": args.listen} if args.listen else {}),
        **{key: value for key, value in named.items() if value},
    }


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for given, option in (
        (args.pidfile, "--pidfile"),
        (args.user, "--user"),
        (args.group, "--group"),
        (args.allow_root, "--allow-root"),
    ):
        if given and not args.daemon:
            p.error(f"{option} needs --daemon")
    try:
        cfg, path = load_config(args.config)
        cfg = config.override(cfg, overrides(args), "command line")
    except config.ConfigError as e:
        print(f"chatd: error: {e}", file=sys.stderr)
        if not args.check_config:
            reexec.cannot_start(str(e))
        return 2
    if args.check_config:
        print(f"chatd: {path or 'built-in defaults'}: configuration is valid")
        return 0
    if args.daemon:
        from chatd.server import daemon  # python-daemon is needed only here

        path = os.path.abspath(path) if path else None  # the daemon runs in /
        return daemon.run(
            cfg,
            path,
            args.pidfile or daemon.DEFAULT_PIDFILE,
            overrides=overrides(args),
            allow_root=args.allow_root,
        )
    try:
        inherited = Inherited.take()
    except systemd.ActivationError as e:
        print(f"chatd: error: {e}", file=sys.stderr)
        return 1
    try:
        server = Server(cfg, path, systemd.Notifier.from_environ(), overrides=overrides(args))
    except config.ConfigError as e:  # log.file cannot be opened
        print(f"chatd: error: {e}", file=sys.stderr)
        if inherited is not None:
            inherited.refuse(notices.RESTART_FAILED(error=str(e)))
        return 1
    if server.notifier.enabled:
        server.fdstore = systemd.fdstore_size()
    try:
        server.open(inherited=inherited)
    except StartupError as e:
        print(f"chatd: error: {e}", file=sys.stderr)
        if inherited is not None:
            inherited.refuse(notices.RESTART_FAILED(error=str(e)))
        server.close_all()
        return 1
    if inherited is not None and inherited.state is not None:
        server.notifier.unstore("state")  # taken: the next restart stores its own
    try:
        return server.run()
    finally:
        server.close_all()
        server.notifier.close()
