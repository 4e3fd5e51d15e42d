"""Atomic file replacement, shared by checkpoints, summaries and the status file.

Bytes go to a temporary file in the same folder (rename is atomic only within one
filesystem), are fsynced, and the file is renamed into place; the folder is fsynced too,
since the rename lives in its entry. A crash at any instant leaves the old file or the
new one under the final name, never a partial one. No torch here: `fedrun watch` and
the status writer import this without paying for torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

# mkstemp creates files readable by the owner alone; outputs should follow the umask
# (a `fedrun watch` by another user on a shared login node must be able to read them).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Any], None],
                 before_rename: Callable[[], None] | None = None) -> None:
    """Write through `write(fileobj)` to a temporary sibling, fsync, rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any, **dumps) -> None:
    text = json.dumps(value, indent=1, **dumps)
    atomic_write(path, lambda f: f.write(text.encode()))
