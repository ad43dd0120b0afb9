"""File names and file kinds, before anything is opened.

display_name: any name the file system holds as a printable str (reports, logs, JSON).
not_regular_reason: why a path is not a regular file (FIFO, device, dangling link, loop ...),
found with stat() only, since opening a FIFO blocks until a writer comes.
"""
from __future__ import annotations

import errno
import os
import stat


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a folder"))


def not_regular_reason(path) -> str | None:
    """None for a regular file (after following symlinks), else why it is skipped. Only stat()
    is called: a FIFO or device is never opened (opening a FIFO blocks until a writer comes)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if os.path.islink(path):
            return f"dangling symlink (its target {display_name(os.readlink(path))} is missing)"
        return f"cannot stat the file ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a regular file"


def display_name(name) -> str:
    """A printable str for any file name: undecodable bytes (surrogate-escaped by os.fsdecode)
    become \\xNN, control characters their escapes, so every report writer can print it."""
    name = os.fspath(name)
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:  # a str with surrogates that no file system produced
        raw = name.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
