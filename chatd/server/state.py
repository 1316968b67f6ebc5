"""The state file: the bans, kept across restarts.

JSON (core/bans.py says what is in it), written atomically: a temporary file in the
same directory, fsync, rename, fsync of the directory.  A missing file is no bans; a
file that cannot be read or does not check out stops the start rather than have chatd
forget its bans.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

from chatd.core.bans import Bans, StateError
from chatd.server.paths import unsafe_directory
from chatd.wire.errors import os_reason


def load(path: str, now: float | None = None) -> Bans:
    """Read the state file; a missing file is no bans.  Raises StateError."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return Bans()
    except OSError as e:
        raise StateError(f"cannot read {path}: {os_reason(e)}") from None
    except ValueError as e:  # JSON or UTF-8
        raise StateError(f"cannot read {path}: not a chatd state file ({e})") from None
    except RecursionError:
        raise StateError(
            f"cannot read {path}: not a chatd state file (nested too deeply)"
        ) from None
    try:
        return Bans.from_json(doc, time.time() if now is None else now)
    except ValueError as e:
        raise StateError(f"cannot read {path}: {e}") from None


def save(path: str, bans: Bans) -> None:
    """Write the state file atomically, creating its directory if missing."""
    data = json.dumps(bans.to_json(), indent=1).encode() + b"\n"
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StateError(f"cannot write {path}: {directory} is not a directory") from None
    except OSError as e:
        raise StateError(f"cannot write {path}: {os_reason(e)}") from None
    unsafe = unsafe_directory(directory)
    if unsafe:
        raise StateError(f"cannot write {path}: {unsafe}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
    except (FileExistsError, NotADirectoryError):
        raise StateError(f"cannot write {path}: {directory} is not a directory") from None
    except OSError as e:
        raise StateError(f"cannot write {path}: {os_reason(e)}") from None
    try:
        with open(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o640)  # the file made, not whatever has its name now
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StateError(f"cannot write {path}: {os_reason(e)}") from None
