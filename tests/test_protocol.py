"""The sans-I/O framer, on its own."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.wire import framing as protocol
from chatd.wire.framing import (
    BadEncoding,
    BadHeader,
    FrameDecoder,
    FrameTooLarge,
    ProtocolError,
    encode,
    encode_bytes,
)


def decode_all(data: bytes, limit: int = 4096, hl: int = 10) -> list[str]:
    d = FrameDecoder(limit, hl)
    d.feed(data)
    return d.frames()


def test_encode_is_the_tutorial_format() -> None:
    assert encode("hello") == b"5         hello"
    assert encode("héllo") == b"6         h\xc3\xa9llo"
    assert encode("", 4) == b"0   "


def test_encode_refuses_what_the_header_cannot_hold() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        encode_bytes(b"x" * 10, header_length=1)


@pytest.mark.parametrize(
    "header", [b"5         ", b"         5", b"0000000005", b"    5     ", b"05        "]
)
def test_left_right_and_zero_padded_headers(header: bytes) -> None:
    assert decode_all(header + b"hello") == ["hello"]


@pytest.mark.parametrize(
    "header",
    [
        b"          ",  # all spaces
        b"abc       ",  # not numeric
        b"-5        ",  # negative
        b"+5        ",  # sign: int() would take it
        b"1_0       ",  # underscore: int() would take it
        b"1 0       ",  # space inside
        b"5\t        "[:10],  # tab padding
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x005",
        "\u0661".encode() + b"        ",  # ARABIC-INDIC DIGIT ONE
        b"0x10      ",
    ],
)
def test_bad_headers(header: bytes) -> None:
    d = FrameDecoder(4096)
    d.feed(header + b"hello")
    with pytest.raises(BadHeader, match="expected a length in ASCII digits"):
        d.next_frame()


def test_length_over_limit_is_refused_before_the_payload_arrives() -> None:
    d = FrameDecoder(100)
    d.feed(b"101       ")
    with pytest.raises(FrameTooLarge, match="101 bytes is over the limit of 100"):
        d.next_frame()


def test_huge_length_is_refused_at_once() -> None:
    d = FrameDecoder(4096)
    d.feed(b"9999999999")
    with pytest.raises(FrameTooLarge):
        d.next_frame()


def test_invalid_utf8_payload() -> None:
    d = FrameDecoder(4096)
    d.feed(b"2         \xc3\x28")
    with pytest.raises(BadEncoding, match="not valid UTF-8"):
        d.next_frame()


def test_partial_frames_wait_for_more() -> None:
    d = FrameDecoder(4096)
    data = encode("hello") + encode("world")
    for i, byte in enumerate(data):
        d.feed(bytes([byte]))
        frame = d.next_frame()
        if i == 14:
            assert frame == "hello"
        elif i == len(data) - 1:
            assert frame == "world"
        else:
            assert frame is None
    assert d.idle


def test_limit_can_change_between_frames() -> None:
    d = FrameDecoder(5)
    d.feed(encode("alice") + encode("a longer message"))
    assert d.next_frame() == "alice"
    d.max_payload = 4096
    assert d.next_frame() == "a longer message"


def test_idle_and_buffered() -> None:
    d = FrameDecoder(4096)
    assert d.idle
    d.feed(b"5    ")
    assert not d.idle and d.buffered == 5
    d.feed(b"     hel")
    assert d.next_frame() is None and not d.idle
    d.feed(b"lo")
    assert d.next_frame() == "hello" and d.idle and d.buffered == 0


def test_zero_length_frame_is_an_empty_string() -> None:
    assert decode_all(encode("") + encode("x")) == ["", "x"]


def test_other_header_lengths() -> None:
    assert decode_all(encode("hi", 4) + encode("there", 4), hl=4) == ["hi", "there"]


def test_large_stream_does_not_keep_consumed_bytes() -> None:
    d = FrameDecoder(4096)
    one = encode("x" * 4000)
    for _ in range(200):
        d.feed(one + one[:100])
        d.frames()
        d.feed(one[100:])
        d.frames()
    assert d.buffered == 0
    assert len(d._buf) < 4 * len(one)


texts = st.lists(st.text(max_size=60), max_size=30)


@given(texts, st.data())
@settings(max_examples=300)
def test_any_split_gives_the_same_frames(messages: list[str], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    d = FrameDecoder(4096)
    got: list[str] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        d.feed(stream[prev:cut])
        prev = cut
        got += d.frames()
    assert got == messages
    assert d.idle


@given(st.binary(max_size=300), st.integers(1, 12), st.integers(0, 200))
@settings(max_examples=500)
def test_garbage_raises_only_protocol_errors(garbage: bytes, hl: int, limit: int) -> None:
    d = FrameDecoder(limit, hl)
    try:
        for i in range(0, len(garbage), 7):
            d.feed(garbage[i : i + 7])
            for frame in d.frames():
                assert len(frame.encode()) <= limit
    except ProtocolError:
        pass


def test_cut_keeps_whole_characters() -> None:
    cut = protocol.cut
    assert cut("héllo", 10) == "héllo"
    assert cut("héllo", 2) == "h"  # not half of the é
    assert cut("ééé", 4) == "éé"
    assert cut("abc", 0) == ""


def test_a_header_that_cannot_be_is_refused_before_it_is_complete() -> None:
    d = FrameDecoder(100)
    d.feed(b"2    ci")  # a 5-byte header: no 10-byte one starts so
    with pytest.raises(BadHeader, match="bad frame header '2    ci'"):
        d.next_frame()
    for start in (b"", b"  ", b"12", b"  12 ", b"0"):  # these may still be headers
        d = FrameDecoder(100)
        d.feed(start)
        assert d.next_frame() is None
