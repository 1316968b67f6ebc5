"""The history's file: an SQLite database in WAL mode, and what is done to it.

The messages are kept in batches, one row per batch the writer commits (at most
BATCH_ROWS messages), each column holding all of the batch's values: their ids
(NULL when they run from ``first`` to ``last``), times (8-byte doubles), senders
and texts (UTF-8, one a line: no name and no message has a line break).  A row per
message would cost SQLite a B-tree insert per message, about three times the CPU
of a batch's one insert, and the writer shares a core with the event loop.  A
batch's ``crc`` (CRC-32 of its ids, times, names and texts) is checked whenever it
is read, and every batch's at start, so that damage that SQLite's own check cannot
see (inside a value) is found too: a file that fails either is corrupt.

Deleting (retention, forget) takes one batch per transaction: the oldest, or the
next one a forget looks at, rewritten without the messages that go.

The schema has a version (``PRAGMA user_version``) and an application id; `MIGRATIONS`
takes a file from any earlier version to this one, each step one transaction.

Every method but `open()` is called from the writer's thread alone (`open()` before
it starts); `query()` reads on a connection of its own.
"""

from __future__ import annotations

import array
import contextlib
import os
import sqlite3
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from chatd.core.history import RING, Row
from chatd.server.paths import unsafe_directory
from chatd.wire.errors import os_reason

APPLICATION_ID = 0x63686174  # "chat", in the database header: the file is chatd's
# Each version's statements, from an empty file on: MIGRATIONS[v] takes version v to
# v + 1.  A released step is never changed; a new version appends one.
MIGRATIONS: list[tuple[str, ...]] = [
    (  # 1: the first release
        """CREATE TABLE batches (
            first INTEGER PRIMARY KEY,  -- the id of its first message (the room's order)
            last INTEGER NOT NULL,      -- of its last
            count INTEGER NOT NULL,     -- messages in it
            began REAL NOT NULL,        -- when its first was said, seconds since the epoch
            ended REAL NOT NULL,        -- when its last was
            ids BLOB,                   -- their ids, 8-byte integers; NULL: first to last
            times BLOB NOT NULL,        -- when each was said, 8-byte doubles
            names BLOB NOT NULL,        -- who said each, UTF-8, one a line
            texts BLOB NOT NULL,        -- what each said, UTF-8, one a line
            crc INTEGER NOT NULL        -- CRC-32 of ids, times, names and texts
        )""",
    ),
]

BUSY_SECONDS = 5.0  # how long a statement waits for a lock another program holds

_COLUMNS = "first, last, count, ids, times, names, texts, crc"
_INSERT = "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_OLDEST = f"SELECT {_COLUMNS} FROM batches ORDER BY first LIMIT 1"
_NEWEST = f"SELECT {_COLUMNS} FROM batches ORDER BY first DESC"
_SINCE = f"SELECT {_COLUMNS} FROM batches WHERE ended >= ? ORDER BY first DESC"
_AFTER = f"SELECT {_COLUMNS} FROM batches WHERE first > ? AND first <= ? ORDER BY first LIMIT 1"
_DELETE = "DELETE FROM batches WHERE first = ?"
_SUMMARY = "SELECT min(first), max(last), coalesce(sum(count), 0) FROM batches"
_BEGAN = "SELECT began FROM batches ORDER BY first LIMIT 1"

Batch = tuple[int, int, int, bytes | None, bytes, bytes, bytes, int]  # as _COLUMNS


class HistoryError(Exception):
    """The history file cannot be used; str() is the one-line reason, naming the file."""


class HistoryFile:
    """The file, its two connections, and how many messages it holds."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None  # the writer's
        self.reader: sqlite3.Connection | None = None  # the deep reads'
        self.count = 0  # messages in the file
        self.first = 0  # the smallest id in it (0: none)
        self.last = 0  # the largest
        self.oldest: float | None = None  # when the first of them was said

    def open(self) -> None:
        """Open (or create) the file, check it, bring its schema up to date.

        Raises HistoryError: a file that cannot be opened, written or read, is not
        chatd's, or is corrupt is never taken for an empty history."""
        path = self.path
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        except OSError as e:
            raise HistoryError(f"cannot create the history {path}: {os_reason(e)}") from None
        unsafe = unsafe_directory(directory)
        if unsafe:
            raise HistoryError(f"history {path} refused: {unsafe}")
        try:
            # Made here, not by SQLite: the OS's words when it cannot be, and mode 0600.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise HistoryError(f"cannot open the history {path}: {os_reason(e)}") from None
        try:
            self.conn = conn = _connect(path, identify=True)
            _check(conn, path)
            migrate(conn)
            try:
                # A write, so that a file or directory chatd cannot write in is found now.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise HistoryError(f"cannot write the history {path}: {words(e)}") from None
            for batch in conn.execute(f"SELECT {_COLUMNS} FROM batches"):
                _verify(batch)
            first, last, self.count = conn.execute(_SUMMARY).fetchone()
            self.first, self.last = first or 0, last or 0
            self._update_oldest()
            self.reader = _connect(path)
            self.reader.execute("PRAGMA query_only = ON")
        except Corrupt as e:
            raise HistoryError(f"the history {path} is corrupt: {e}") from None
        except sqlite3.Error as e:
            raise HistoryError(f"cannot open the history {path}: {words(e)}") from None

    def close(self) -> None:
        for conn in (self.conn, self.reader):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def newest(self, count: int = RING) -> list[Row]:
        """The last ``count`` messages, oldest first."""
        assert self.conn is not None
        found: list[Row] = []
        for batch in self.conn.execute(_NEWEST):
            found[:0] = decode(batch)
            if len(found) >= count:
                break
        return found[-count:] if count else []

    # Writing (each method one transaction; sqlite3.Error when it failed).

    def append(self, rows: Sequence[Row]) -> None:
        """Commit ``rows`` (ids growing, after every id in the file) as one batch."""
        conn = self.conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_INSERT, encode(rows))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if not self.count:
            self.first, self.oldest = rows[0][0], rows[0][1]
        self.count += len(rows)
        self.last = rows[-1][0]

    def drop_oldest(self, count: int) -> int:
        """Delete the oldest messages, ``count`` at most, from the oldest batch only;
        return how many went."""
        batch = self._oldest_batch()
        if batch is None or count <= 0:
            return 0
        rows = decode(batch)
        return self._rewrite(batch, rows[min(count, len(rows)) :])

    def expire(self, before: float) -> tuple[int, bool]:
        """Delete the messages of the oldest batch said before ``before``: (how many
        went, whether the next batch may hold more)."""
        batch = self._oldest_batch()
        if batch is None:
            return 0, False
        rows = decode(batch)
        kept = [r for r in rows if r[1] >= before]
        return self._rewrite(batch, kept), not kept

    def forget(self, folded: str, up_to: int, after: int) -> tuple[int, int | None]:
        """In the first batch after id ``after`` (up to ``up_to``), delete the messages
        of the name whose casefold is ``folded``: (how many went, where the next step
        begins, or None when done)."""
        assert self.conn is not None
        batch = self.conn.execute(_AFTER, (after, up_to)).fetchone()
        if batch is None:
            return 0, None
        rows = decode(batch)
        kept = [r for r in rows if r[0] > up_to or r[2].casefold() != folded]
        gone = self._rewrite(batch, kept) if len(kept) < len(rows) else 0
        return gone, batch[0]

    def _oldest_batch(self) -> Batch | None:
        assert self.conn is not None
        batch: Batch | None = self.conn.execute(_OLDEST).fetchone()
        return batch

    def _rewrite(self, batch: Batch, kept: list[Row]) -> int:
        """Put ``kept`` in the place of ``batch`` (nothing if it is empty)."""
        conn = self.conn
        assert conn is not None
        gone = batch[2] - len(kept)
        if not gone:
            return 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_DELETE, (batch[0],))
            if kept:
                conn.execute(_INSERT, encode(kept))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self.count -= gone
        if batch[0] == self.first or not self.count:
            first = conn.execute("SELECT min(first) FROM batches").fetchone()[0]
            self.first = first or 0
            self._update_oldest()
        return gone

    def _update_oldest(self) -> None:
        assert self.conn is not None
        row = self.conn.execute(_BEGAN).fetchone()
        self.oldest = None if row is None else float(row[0])

    # Reading (the reader's connection).

    def query(self, limit: int, since: float, folded: str | None) -> list[Row]:
        """The last ``limit`` messages said at ``since`` or later, by the name whose
        casefold is ``folded`` if given, oldest first."""
        assert self.reader is not None
        found: list[Row] = []
        if limit <= 0:
            return found
        for batch in self.reader.execute(_SINCE, (since,)):
            for row in reversed(decode(batch)):
                if row[1] >= since and (folded is None or row[2].casefold() == folded):
                    found.append(row)
                    if len(found) == limit:
                        found.reverse()
                        return found
        found.reverse()
        return found


# The batch format.


class Corrupt(sqlite3.DatabaseError):
    """A batch that does not check out."""


def encode(rows: Sequence[Row]) -> tuple[Any, ...]:
    """A batch's row for _INSERT."""
    ids, times, names, texts = zip(*rows)  # noqa: B905 (rows are 4-tuples)
    first, last, count = ids[0], ids[-1], len(rows)
    id_data = None if last - first + 1 == count else _pack("q", ids)
    time_data = _pack("d", times)
    name_data = _lines(names, count)
    text_data = _lines(texts, count)
    crc = _crc(id_data, time_data, name_data, text_data)
    return (first, last, count, times[0], times[-1], id_data, time_data, name_data, text_data, crc)


def _crc(*parts: bytes | None) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part or b"", crc)
    return crc


def decode(batch: Batch) -> list[Row]:
    """The messages of a batch, oldest first; Corrupt if it does not check out."""
    first, last, count, id_data, time_data, name_data, text_data, _ = _verify(batch)
    try:
        ids: Sequence[int] = range(first, last + 1) if id_data is None else _unpack("q", id_data)
        times = _unpack("d", time_data)
        names = name_data.decode().split("\n")
        texts = text_data.decode().split("\n")
    except (ValueError, TypeError, AttributeError):  # not UTF-8, not whole numbers...
        raise Corrupt(f"the batch of messages {first} to {last} cannot be read") from None
    if not len(ids) == len(times) == len(names) == len(texts) == count:
        raise Corrupt(f"the batch of messages {first} to {last} does not add up")
    return list(zip(ids, times, names, texts, strict=True))


def _verify(batch: Batch) -> Batch:
    first, last, _, id_data, time_data, name_data, text_data, crc = batch
    try:
        got = _crc(id_data, time_data, name_data, text_data)
    except TypeError:  # a value of another type: not chatd's writing
        got = None
    if got != crc:
        raise Corrupt(f"the batch of messages {first} to {last} fails its checksum")
    return batch


def _lines(values: Sequence[str], count: int) -> bytes:
    data = "\n".join(values).encode()
    if data.count(b"\n") != count - 1:  # never from the chat, which refuses line breaks
        data = "\n".join(v.replace("\n", " ") for v in values).encode()
    return data


def _pack(code: str, values: Sequence[Any]) -> bytes:
    a = array.array(code, values)
    if sys.byteorder == "big":  # the file is little-endian wherever it is written
        a.byteswap()
    return a.tobytes()


def _unpack(code: str, data: bytes) -> array.array[Any]:
    a = array.array(code)
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a


def rows(conn: sqlite3.Connection) -> Iterator[Row]:
    """Every message in the file, oldest first (for tests and tools)."""
    for batch in conn.execute(f"SELECT {_COLUMNS} FROM batches ORDER BY first"):
        yield from decode(batch)


# The file.


def _connect(path: str, *, identify: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode, synchronous=NORMAL; with ``identify``, one that first
    makes sure the file is chatd's (or empty), before anything changes it."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_SECONDS
    )
    try:
        if identify:
            _identify(conn, path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode (journal mode {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _identify(conn: sqlite3.Connection, path: str) -> None:
    """Refuse a file that is someone else's database, or is newer than this chatd."""
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app != APPLICATION_ID and (app or version or tables):
        raise HistoryError(f"{path} is not a chatd history: an SQLite database of another kind")
    if version > len(MIGRATIONS):
        raise HistoryError(
            f"the history {path} is of a newer chatd (schema version {version}, "
            f"this one knows {len(MIGRATIONS)} at most)"
        )


def _check(conn: sqlite3.Connection, path: str) -> None:
    """Refuse a file SQLite finds damaged (quick_check: every page, not the values)."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(1)")]
    if problems != ["ok"]:
        raise HistoryError(f"the history {path} is corrupt: {' '.join(problems[0].split())}")


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the file's schema to the latest version, one transaction per step."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for v in range(version, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[v]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {v + 1}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def words(error: sqlite3.Error) -> str:
    """An SQLite error on one line."""
    return " ".join(str(error).split()) or type(error).__name__
