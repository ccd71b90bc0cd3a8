"""Atomic file writes and checksums: never leave a truncated plan or model behind, detect corruption."""
import hashlib
import os
import tempfile
from typing import Callable, Dict, Iterable

import torch


def _default_mode() -> int:
    """0666 minus the process umask: the mode ``open(path, "w")`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str, write: Callable[[str], object], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    The rename is atomic on POSIX file systems, so readers see the old file or the new one, never a
    partial one; on any error the temporary file is removed and the old file is left as it was.
    The file gets the permissions a plain ``open(path, "w")`` gives (not mkstemp's private 0600).
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_hex(text: bytes, tensors: Dict[str, torch.Tensor] = None) -> str:
    """SHA-256 over ``text`` and, in name order, each tensor's name, dtype, shape and raw bytes."""
    h = hashlib.sha256(text)
    for name in sorted(tensors or {}):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_readable_file(path: str, error: Callable[[str], Exception], what: str) -> None:
    """Raise ``error(message)`` when ``path`` is missing or not a regular file."""
    if os.path.isdir(path):
        raise error(f"{path} is a directory, not a {what} file; pass the file's path.")
    if not os.path.exists(path):
        raise error(f"no such file: {path} (expected a {what} file).")


def first_bytes(path: str, n: int = 9) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def is_torch_pickle(head: bytes) -> bool:
    """True for torch.save archives (zip) and legacy pickles: files that must never be unpickled.

    A safetensors file starts with its 8-byte header length, whose first byte may well be 0x80 (the
    pickle opcode PROTO); its JSON header then starts at byte 8 with ``{``, which no pickle has there.
    """
    if head.startswith(b"PK\x03\x04"):
        return True
    return head[:1] == b"\x80" and head[8:9] != b"{"


__all__: Iterable[str] = ["atomic_write", "sha256_hex", "check_readable_file", "first_bytes", "is_torch_pickle"]
