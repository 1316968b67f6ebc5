"""chatd: a LAN group-chat daemon."""

__version__ = "0.1.0"
