"""A member's state, as the chat sees it (the transport keeps its own)."""

HANDSHAKE = "handshake"  # connected, no name yet
JOINED = "joined"  # a member of the room
GONE = "gone"  # left or refused; the server is closing its connection
