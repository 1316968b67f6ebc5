"""What the chat does, without I/O: the room, the rules a connection goes through, bans
and the admin commands.

Imports only chatd.wire (and structlog, for its events); the time comes from the
`Host` the server implements, so every rule can be tested with a fake clock.
"""
