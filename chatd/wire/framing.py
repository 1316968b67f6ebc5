"""Framing: the length-prefixed frames of the classic chatroom protocol, without I/O.

A frame is a header of exactly ``header_length`` bytes holding the payload
length in ASCII decimal, then that many bytes of UTF-8.  The classic tutorial
writes the header left-justified and space-padded (``f"{n:<10}"``); a
right-justified or zero-padded header is accepted too.  Anything else, a
length over the limit, or a payload that is not UTF-8 is a `ProtocolError`.

`FrameDecoder` only buffers what it is fed and hands out whole frames; it
never touches a socket, so it can be fed one byte at a time or fifty frames at
once and gives the same answer.
"""

from __future__ import annotations

import re

DEFAULT_HEADER_LENGTH = 10


class ProtocolError(Exception):
    """The peer broke the framing; the connection cannot continue.

    ``reason`` is a short machine-readable tag for logs and counters,
    the message a sentence fit to show the peer.
    """

    reason = "protocol error"


class BadHeader(ProtocolError):
    reason = "bad header"


class FrameTooLarge(ProtocolError):
    reason = "frame too large"


class BadEncoding(ProtocolError):
    reason = "invalid utf-8"


def encode(text: str, header_length: int = DEFAULT_HEADER_LENGTH) -> bytes:
    """Return one frame carrying ``text``."""
    payload = text.encode()
    return encode_bytes(payload, header_length)


def encode_bytes(payload: bytes, header_length: int = DEFAULT_HEADER_LENGTH) -> bytes:
    """Return one frame carrying ``payload``, already UTF-8."""
    header = b"%-*d" % (header_length, len(payload))
    if len(header) != header_length:
        raise ValueError(f"{len(payload)} bytes do not fit a {header_length}-byte header")
    return header + payload


def max_length(header_length: int) -> int:
    """The largest payload a header of ``header_length`` digits can announce."""
    return int(10**header_length) - 1


def cut(text: str, max_bytes: int) -> str:
    """``text``, shortened if need be to at most ``max_bytes`` of UTF-8 (whole characters)."""
    data = text.encode()
    # equivalent: slicing to len(data) keeps it all
    if len(data) <= max_bytes:  # pragma: no mutate
        return text
    return data[: max(max_bytes, 0)].decode(errors="ignore")


# What the first bytes of a header can be: its padding, then its digits, then padding.
_HEADER_START = re.compile(rb" *[0-9]* *")


class FrameDecoder:
    """Turn a byte stream into frames.

    ``feed()`` buffers bytes; ``next_frame()`` returns the next payload as
    text, or None when more bytes are needed.  ``max_payload`` may be changed
    between frames (a name has a smaller limit than a message); it is checked
    as soon as a header is complete, before the payload is buffered.
    """

    __slots__ = ("_buf", "_need", "_pos", "header_length", "max_payload")

    def __init__(self, max_payload: int, header_length: int = DEFAULT_HEADER_LENGTH) -> None:
        if header_length < 1:
            raise ValueError("header_length must be at least 1")
        self.header_length = header_length
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0  # start of the unparsed bytes in _buf
        self._need = -1  # payload length of the frame in progress, -1 before its header

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            # Everything was consumed: start over instead of growing.
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    @property
    def idle(self) -> bool:
        """True when no partial frame is buffered."""
        return self._pos == len(self._buf) and self._need < 0

    def next_frame(self) -> str | None:
        buf = self._buf
        pos = self._pos
        need = self._need
        # equivalent as <= 0 or < 1: between calls _need is -1 or a length of at least 1
        # (a header of 0 is consumed at once)
        if need < 0:  # pragma: no mutate
            end = pos + self.header_length
            if len(buf) < end:
                if pos < len(buf) and not _HEADER_START.fullmatch(buf, pos):
                    # No header starts so: say so now rather than wait for the rest
                    # (a peer using a shorter header length would wait forever).
                    self._parse_header(buf[pos:])
                return None
            need = self._parse_header(buf[pos:end])
            pos = end
            self._pos = pos
            self._need = need
        end = pos + need
        if len(buf) < end:
            return None
        payload = buf[pos:end]  # a copy: buf may be cleared below
        self._need = -1
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
            if end > 65536 and end * 2 > len(buf):
                # Drop the consumed front once it is the larger part.
                del buf[:end]
                self._pos = 0
        try:
            return payload.decode()
        except UnicodeDecodeError:
            raise BadEncoding("the payload is not valid UTF-8") from None

    def unparsed(self) -> bytes:
        """What was fed and not yet returned as frames, as a new decoder needs it to go
        on where this one stopped (a restart hands it over); a header already read is
        written again, left-justified."""
        rest = bytes(self._buf[self._pos :])
        if self._need < 0:
            return rest
        return b"%-*d" % (self.header_length, self._need) + rest

    def frames(self) -> list[str]:
        """Return every complete frame buffered so far."""
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    def _parse_header(self, header: bytes | bytearray) -> int:
        digits = header.strip(b" ")
        # isdigit() on bytes is ASCII-only; int() alone would take " +1_0".
        if not digits.isdigit():
            shown = header.decode("ascii", "backslashreplace")
            raise BadHeader(f"bad frame header {shown!r}: expected a length in ASCII digits")
        length = int(digits)
        if length > self.max_payload:
            raise FrameTooLarge(f"frame of {length} bytes is over the limit of {self.max_payload}")
        return length
