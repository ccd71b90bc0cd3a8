"""Atomic file writes: never leave a truncated plan or model behind."""
import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], object], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    The rename is atomic on POSIX file systems, so readers see the old file or the new one, never a
    partial one; on any error the temporary file is removed and the old file is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
