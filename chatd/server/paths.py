"""Directories chatd writes its socket and state in, checked as OpenSSH's StrictModes
checks a user's files: a user who could rename entries in one could swap chatd's file
for a link between its creation and its chmod or chown, and have root's chatd act on a
file of the user's choosing."""

from __future__ import annotations

import os
import stat


def unsafe_directory(directory: str) -> str | None:
    """Why chatd must not create files in ``directory``, or None if it may.

    It may when root or chatd's own user owns it and nobody else may write in it,
    or everybody may but the sticky bit keeps them to their own entries (/tmp).
    """
    try:
        st = os.stat(directory)
    except OSError:
        return None  # not there: creating it reports the error
    if st.st_uid not in (0, os.geteuid()):
        return f"{directory} belongs to uid {st.st_uid}, neither root nor chatd's user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"{directory} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
