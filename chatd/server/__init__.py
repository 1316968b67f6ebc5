"""The daemon's I/O: the event loop, connections, the control socket, config, logs,
systemd, daemon mode, and `main` for the `chatd` command."""
