"""`qam._io`: atomic writes (temporary file in the same directory, fsync, `os.replace`)."""

import errno
import json
import os

import numpy as np
import pytest

from qam import _io


def _write(kind, path, value):
    """Write with one of the four writers; `value` is a plain string turned into its payload."""
    if kind == "bytes":
        _io.atomic_write_bytes(path, value.encode())
    elif kind == "text":
        _io.atomic_write_text(path, value)
    elif kind == "json":
        _io.atomic_write_json(path, {"value": value})
    else:
        _io.atomic_savez(path, {"value": np.array(value)})


KINDS = ["bytes", "text", "json", "savez"]


def _listing(directory):
    return sorted(os.listdir(directory))


def test_writers_write_what_they_are_given(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"  # parents are created
    _io.atomic_write_bytes(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_io._UMASK  # not mkstemp's 0o600

    text = tmp_path / "t.txt"
    _io.atomic_write_text(text, "é\r\nx")
    assert text.read_bytes() == "é\r\nx".encode()  # UTF-8, newlines as given
    _io.atomic_write_text(text, "é", encoding="latin-1")
    assert text.read_bytes() == b"\xe9"

    payload = {"b": [1, 2.5], "a": None}
    js = tmp_path / "p.json"
    _io.atomic_write_json(js, payload)
    assert js.read_text() == json.dumps(payload)  # as is, no trailing newline
    _io.atomic_write_json(js, {"p": tmp_path}, indent=2, default=str, sort_keys=True)
    assert js.read_text() == json.dumps({"p": str(tmp_path)}, indent=2)

    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([True, False])}
    for compressed in (True, False):
        npz = tmp_path / f"d{compressed}.npz"
        _io.atomic_savez(npz, arrays, compressed=compressed)
        with np.load(npz) as data:
            assert set(data.files) == {"x", "y"}
            for k, v in arrays.items():
                np.testing.assert_array_equal(data[k], v)
                assert data[k].dtype == v.dtype
    assert _listing(tmp_path) == ["a", "dFalse.npz", "dTrue.npz", "p.json", "t.txt"]


@pytest.mark.parametrize("kind", KINDS)
def test_replaces_atomically(tmp_path, kind):
    """The new contents arrive as a new file moved over the old one: a reader that opened the
    old file keeps reading it whole, and the directory holds no temporary afterwards."""
    path = tmp_path / "f"
    _write(kind, path, "old")
    before = path.read_bytes()
    with open(path, "rb") as reader:
        inode = os.fstat(reader.fileno()).st_ino
        _write(kind, path, "new")
        assert reader.read() == before
    assert os.stat(path).st_ino != inode
    assert path.read_bytes() != before
    assert _listing(tmp_path) == ["f"]


def test_destination_unchanged_while_writing(tmp_path):
    """While the archive is being written (here: while one of its members is pickled), `path`
    still holds the old file."""
    path = tmp_path / "d.npz"
    _io.atomic_write_bytes(path, b"old")
    seen = []

    class Probe:
        def __reduce__(self):
            seen.append((path.read_bytes(), _listing(tmp_path)))
            return (int, (0,))

    _io.atomic_savez(path, {"x": np.array([Probe()], dtype=object)})
    [(contents, listing)] = seen
    assert contents == b"old"
    assert len(listing) == 2 and listing[0].startswith(".d.npz.") and listing[0].endswith(".tmp")
    assert _listing(tmp_path) == ["d.npz"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot serialise this")


class _Interrupt:
    def __reduce__(self):
        raise KeyboardInterrupt


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, error):
    """A payload whose serialisation raises mid-write (an archive member that cannot be
    pickled; also a Ctrl-C): the exception propagates, the old file stays, no temporary file."""
    path = tmp_path / "d.npz"
    _io.atomic_savez(path, {"x": np.arange(3)})
    old = path.read_bytes()
    member = _Unpicklable() if error is RuntimeError else _Interrupt()
    arrays = {"a": np.zeros(1000), "b": np.array([member], dtype=object)}
    with pytest.raises(error):
        _io.atomic_savez(path, arrays)
    assert path.read_bytes() == old
    assert _listing(tmp_path) == ["d.npz"]


def test_unserialisable_json_touches_nothing(tmp_path):
    path = tmp_path / "p.json"
    _io.atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError, match="not JSON serializable"):
        _io.atomic_write_json(path, {"a": object()})
    with pytest.raises(ValueError, match="Circular"):
        loop = []
        loop.append(loop)
        _io.atomic_write_json(path, loop)
    assert path.read_text() == '{"a": 1}'
    assert _listing(tmp_path) == ["p.json"]


def test_failed_replace_removes_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    _io.atomic_write_text(path, "old")

    def fail(src, dst):
        raise PermissionError(errno.EACCES, "denied", dst)

    monkeypatch.setattr(_io.os, "replace", fail)
    with pytest.raises(PermissionError, match="denied"):
        _io.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert _listing(tmp_path) == ["f.txt"]


class _FailingFile:
    """A binary file whose `write` raises `OSError(code)`; everything else is the real file's."""

    def __init__(self, f, code):
        self._f, self._code = f, code

    def write(self, data):
        raise OSError(self._code, os.strerror(self._code))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._f.close()


def _failing_fdopen(monkeypatch, code):
    real = os.fdopen
    monkeypatch.setattr(_io.os, "fdopen", lambda fd, mode: _FailingFile(real(fd, mode), code))


@pytest.mark.parametrize("kind", KINDS)
def test_full_disk_names_the_file(tmp_path, monkeypatch, kind):
    path = tmp_path / "f"
    _write(kind, path, "old")
    old = path.read_bytes()
    _failing_fdopen(monkeypatch, errno.ENOSPC)
    with pytest.raises(OSError) as info:
        _write(kind, path, "new")
    assert str(info.value) == f"[Errno {errno.ENOSPC}] no space left on device writing {path}"
    assert info.value.errno == errno.ENOSPC
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    assert path.read_bytes() == old
    assert _listing(tmp_path) == ["f"]


def test_full_disk_at_fsync_and_other_errors(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", full)
    with pytest.raises(OSError, match="no space left on device writing .*f.txt"):
        _io.atomic_write_text(path, "x")
    assert _listing(tmp_path) == []
    monkeypatch.undo()
    _failing_fdopen(monkeypatch, errno.EIO)  # any other OSError is re-raised as it was
    with pytest.raises(OSError) as info:
        _io.atomic_write_text(path, "x")
    assert info.value.errno == errno.EIO and info.value.__cause__ is None
    assert _listing(tmp_path) == []
