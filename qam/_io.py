"""Atomic file writes, shared by the logger, the report, the trainer and the dataset generator
(private; `qam.logging` re-exports `atomic_write_bytes` and `atomic_write_text`).

Every function writes a temporary file in the destination's directory, flushes and `fsync`s it,
then `os.replace`s it over the destination, so readers see the old file or the new one, never a
partial one, even if the process dies mid-write. On any exception the temporary file is removed
and the exception re-raised; a full disk (`ENOSPC`) is re-raised as an `OSError` naming the
destination. Parent directories are created. Files get the usual permissions (`0o666` minus the
umask), not `mkstemp`'s `0o600`.
"""

import errno
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np


__all__ = [
    "atomic_savez", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
    "atomic_write_with",
]  # fmt: skip

StrPath = str | os.PathLike

# The process umask, read once (the only portable way to read it is to set it).
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: StrPath, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write` on a temporary binary file next to `path`, then move it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device writing {path}") from error
        raise


def atomic_write_with(path: StrPath, write: Callable[[IO[bytes]], Any]) -> None:
    """Stream a file to `path` atomically: `write(f)` on a temporary binary file (e.g.
    `lambda f: eqx.tree_serialise_leaves(f, tree)`), then the same guarantees as
    `atomic_write_bytes`."""
    _atomic_write(path, write)


def atomic_write_bytes(path: StrPath, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docs).

    **Arguments:**

    - `path`: the destination file.
    - `data`: the full new contents.

    **Raises:**

    `OSError` (`errno.ENOSPC`, "no space left on device writing `path`") when the disk is full;
    any other error as raised. The temporary file is removed either way.
    """
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: StrPath, text: str, *, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` for text (`encoding`, default UTF-8; newlines written as given).

    **Arguments:**

    - `path`: the destination file.
    - `text`: the full new contents.
    - `encoding`: the text encoding.
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: StrPath, payload: Any, **json_kwargs: Any) -> None:
    """Write `json.dumps(payload, **json_kwargs)` to `path` atomically, as UTF-8 and as is (no
    trailing newline added).

    The payload is serialised before the temporary file is created, so a payload that does not
    serialise raises (`TypeError`, `ValueError`) with `path` untouched and nothing left behind.

    **Arguments:**

    - `path`: the destination file.
    - `payload`: a JSON-serialisable value.
    - `**json_kwargs`: keyword arguments for `json.dumps` (`indent`, `default`, ...).
    """
    atomic_write_text(path, json.dumps(payload, **json_kwargs))


def atomic_savez(path: StrPath, arrays: Mapping[str, Any], *, compressed: bool = True) -> None:
    """Write `arrays` as an `.npz` archive to `path` atomically (`np.savez_compressed`, or
    `np.savez` with `compressed=False`), streamed to the temporary file.

    **Arguments:**

    - `path`: the destination file (written as given: no `.npz` is appended).
    - `arrays`: name -> array.
    - `compressed`: compress the archive's members.
    """
    save = np.savez_compressed if compressed else np.savez
    _atomic_write(path, lambda f: save(f, **arrays))  # pyright: ignore[reportArgumentType]
