"""The framer (chatd.wire.framing) in detail: exact error messages, the header sizes,
cutting, and how the decoder keeps its buffer small on a stream that never pauses."""

from __future__ import annotations

import pytest

from chatd.wire import framing
from chatd.wire.framing import BadEncoding, BadHeader, FrameDecoder, FrameTooLarge, encode


def frame_of(total: int) -> bytes:
    """One frame of ``total`` bytes in all, its 10-byte header included."""
    return encode("x" * (total - 10))


# Errors, each with its message and reason.


def test_a_header_length_below_one_is_refused() -> None:
    with pytest.raises(ValueError) as e:
        FrameDecoder(100, 0)
    assert str(e.value) == "header_length must be at least 1"
    d = FrameDecoder(100, 1)  # the smallest header
    d.feed(b"3abc0")
    assert d.frames() == ["abc", ""]


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        (b"X5        ", "'X5        '"),
        (b"5        X", "'5        X'"),
        (b"5 5       ", "'5 5       '"),
        (b"\xff5        ", "'\\\\xff5        '"),
    ],
)
def test_a_bad_header_is_shown_in_the_message(header: bytes, shown: str) -> None:
    d = FrameDecoder(4096)
    d.feed(header + b"hello")
    with pytest.raises(BadHeader) as e:
        d.next_frame()
    assert str(e.value) == f"bad frame header {shown}: expected a length in ASCII digits"
    assert e.value.reason == "bad header"


def test_too_large_and_bad_encoding_messages() -> None:
    d = FrameDecoder(10)
    d.feed(b"11        ")
    with pytest.raises(FrameTooLarge) as big:
        d.next_frame()
    assert str(big.value) == "frame of 11 bytes is over the limit of 10"
    assert big.value.reason == "frame too large"
    d = FrameDecoder(10)
    d.feed(b"1         \xff")
    with pytest.raises(BadEncoding) as bad:
        d.next_frame()
    assert str(bad.value) == "the payload is not valid UTF-8"
    assert bad.value.reason == "invalid utf-8"


def test_a_frame_at_the_limit_is_accepted() -> None:
    d = FrameDecoder(10)
    d.feed(encode("x" * 10))
    assert d.next_frame() == "x" * 10


# Frames that end exactly where the buffer does.


def test_an_empty_frame_alone_in_the_buffer_is_returned() -> None:
    d = FrameDecoder(10)
    d.feed(encode(""))
    assert d.next_frame() == ""
    assert d.idle and d.buffered == 0


def test_a_header_alone_is_checked_at_once_and_waits_for_its_payload() -> None:
    d = FrameDecoder(10)
    d.feed(b"5         ")
    assert d.next_frame() is None
    assert not d.idle  # the frame is under way, though every byte was parsed
    assert d.buffered == 0
    d.feed(b"hel")
    assert d.next_frame() is None and d.buffered == 3
    d.feed(b"lo")
    assert d.next_frame() == "hello" and d.idle


def test_a_partial_frame_survives_a_feed_after_a_whole_one() -> None:
    d = FrameDecoder(4096)
    d.feed(encode("one") + encode("two")[:7])
    assert d.next_frame() == "one"
    assert d.buffered == 7
    d.feed(encode("two")[7:] + encode("three"))
    assert d.frames() == ["two", "three"]
    assert d.idle


# The buffer: what was consumed does not stay.


def test_feed_starts_over_once_everything_was_consumed() -> None:
    d = FrameDecoder(4096)
    d.feed(b"5         ")
    assert d.next_frame() is None  # the header is consumed, the buffer is empty of news
    d.feed(b"hel")
    assert bytes(d._buf) == b"hel"  # the header is gone, not kept in front
    d.feed(b"lo")
    assert d.next_frame() == "hello"


def test_a_buffer_that_never_empties_drops_its_consumed_front() -> None:
    # More than 64 KiB consumed and more than half of the buffer: compacted.
    d = FrameDecoder(1 << 20)
    d.feed(frame_of(65537) + b"3    ")
    assert d.next_frame() == "x" * 65527
    assert len(d._buf) == 5 and d.buffered == 5
    d.feed(b"     abc")
    assert d.next_frame() == "abc" and d.idle


def test_compaction_waits_for_more_than_64_kib_consumed() -> None:
    d = FrameDecoder(1 << 20)
    d.feed(frame_of(65536) + b"3    ")
    assert d.next_frame() == "x" * 65526
    assert len(d._buf) == 65541 and d.buffered == 5
    d.feed(b"     abc")
    assert d.next_frame() == "abc"


def test_compaction_waits_for_more_than_half_the_buffer_consumed() -> None:
    d = FrameDecoder(1 << 20)
    d.feed(frame_of(70000) + frame_of(70000)[:-1])
    assert d.next_frame() == "x" * 69990
    assert len(d._buf) == 69999  # 70000 of 139999 bytes consumed: compacted
    d = FrameDecoder(1 << 20)
    d.feed(frame_of(70000) + frame_of(70010)[:70000])
    assert d.next_frame() == "x" * 69990
    assert len(d._buf) == 140000  # exactly half consumed: kept
    d.feed(frame_of(70010)[70000:])
    assert d.next_frame() == "x" * 70000


def test_a_small_buffer_is_never_compacted() -> None:
    d = FrameDecoder(4096)
    d.feed(encode("x" * 10) + b"3         ")
    assert d.next_frame() == "x" * 10
    assert len(d._buf) == 30 and d.buffered == 10


# Encoding, header sizes and cutting.


@pytest.mark.parametrize(("header_length", "largest"), [(1, 9), (2, 99), (3, 999)])
def test_max_length_is_what_the_header_holds(header_length: int, largest: int) -> None:
    assert framing.max_length(header_length) == largest
    assert len(framing.encode_bytes(b"x" * largest, header_length)) == header_length + largest
    with pytest.raises(ValueError):
        framing.encode_bytes(b"x" * (largest + 1), header_length)


def test_max_length_of_the_classic_header() -> None:
    assert framing.max_length(10) == 9_999_999_999


def test_encode_bytes_messages_and_padding() -> None:
    assert framing.encode_bytes(b"abc", 4) == b"3   abc"
    assert framing.encode("é", 2) == b"2 \xc3\xa9"
    with pytest.raises(ValueError) as e:
        framing.encode_bytes(b"x" * 100, 2)
    assert str(e.value) == "100 bytes do not fit a 2-byte header"


@pytest.mark.parametrize(
    ("text", "max_bytes", "cut"),
    [
        ("abc", 3, "abc"),
        ("abc", 2, "ab"),
        ("abc", 0, ""),
        ("abc", -1, ""),
        ("aé", 2, "a"),
        ("aé", 3, "aé"),
        ("€uro", 2, ""),
    ],
)
def test_cut(text: str, max_bytes: int, cut: str) -> None:
    assert framing.cut(text, max_bytes) == cut
