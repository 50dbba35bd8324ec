import csv
import dataclasses
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from qam import _io, logging as qlog


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- conversion
def test_to_python():
    @dataclasses.dataclass
    class Config:
        lr: float = 3e-4
        sizes: tuple = (256, 256)

    value = {
        "a": np.float32(0.1),
        "b": jnp.asarray(3, jnp.int32),
        "c": np.bool_(True),
        "d": jnp.asarray([1.5, 2.5]),
        "e": (1, np.int64(2)),
        "f": Config(),
        "g": None,
        1: "x",
    }
    out = qlog.to_python(value)
    assert out == {
        "a": 0.1,
        "b": 3,
        "c": True,
        "d": [1.5, 2.5],
        "e": [1, 2],
        "f": {"lr": 3e-4, "sizes": [256, 256]},
        "g": None,
        "1": "x",
    }
    assert type(out["a"]) is float and type(out["b"]) is int and type(out["c"]) is bool
    json.dumps(out)  # plain Python throughout


# ----------------------------------------------------------------------------- logger
def test_log_scalars_numpy_jax_and_seed_arrays(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        row = logger.log(
            1000,
            {
                "loss": 0.5,
                "np_loss": np.float32(0.25),
                "jax_loss": jnp.asarray(1.5, jnp.float32),
                "count": np.int64(7),
                "success": np.array([0.2, 0.4, 0.9], np.float32),
                "ret": jnp.asarray([-1.0, -3.0]),
                "flag": np.bool_(False),
                "phase": "offline",
            },
            prefix="train",
        )
    expected = {
        "step": 1000,
        "loss": 0.5,
        "np_loss": 0.25,
        "jax_loss": 1.5,
        "count": 7,
        "success": 0.5,
        "success/seed0": 0.2,
        "success/seed1": 0.4,
        "success/seed2": 0.9,
        "ret": -2.0,
        "ret/seed0": -1.0,
        "ret/seed1": -3.0,
        "flag": False,
        "phase": "offline",
    }
    assert row == expected
    assert _jsonl(tmp_path / "train.jsonl") == [expected]
    assert _read(tmp_path / "train.csv") == (
        "step,loss,np_loss,jax_loss,count,success,success/seed0,success/seed1,success/seed2,"
        "ret,ret/seed0,ret/seed1,flag,phase\n"
        "1000,0.5,0.25,1.5,7,0.5,0.2,0.4,0.9,-2.0,-1.0,-3.0,False,offline\n"
    )


def test_one_seed_and_trailing_axes(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        row = logger.log(5, {"x": np.array([3.0]), "y": np.array([[1.0, 3.0], [5.0, 7.0]])},
                         prefix="eval")  # fmt: skip
    assert row == {"step": 5, "x": 3.0, "x/seed0": 3.0, "y": 4.0, "y/seed0": 2.0, "y/seed1": 6.0}


def test_new_key_rewrites_header(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        logger.log(1, {"a": 1.0}, prefix="train")
        logger.log(2, {"a": 2.0, "b": np.array([1, 3])}, prefix="train")
        logger.log(3, {"b": np.array([5, 7])}, prefix="train")
    assert _read(tmp_path / "train.csv") == (
        "step,a,b,b/seed0,b/seed1\n1,1.0,,,\n2,2.0,2.0,1,3\n3,,6.0,5,7\n"
    )
    assert [r["step"] for r in _jsonl(tmp_path / "train.jsonl")] == [1, 2, 3]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _run(logger, steps, *, new_key_at=7):
    """A deterministic fake training loop: train rows every step, eval rows every 2 steps."""
    for step in steps:
        metrics = {"loss": np.float32(1.0 / step), "q": jnp.asarray([step, 2.0 * step])}
        if step >= new_key_at:
            metrics["online_return"] = np.array([step * 0.5, -1.0])
        logger.log(step, metrics, prefix="train")
        if step % 2 == 0:
            logger.log(step, {"success": np.array([step / 10, step / 20])}, prefix="eval")


def test_resume_truncates_and_matches_uninterrupted(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    with qlog.Logger(full) as logger:
        _run(logger, range(1, 11))
    # Interrupted after step 8 (past the new key at 7), with a torn last line; resumed from a
    # checkpoint at step 5.
    with qlog.Logger(resumed) as logger:
        _run(logger, range(1, 9))
    with open(resumed / "train.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    with qlog.Logger(resumed, resume_step=5) as logger:
        assert max(r["step"] for r in _jsonl(resumed / "train.jsonl")) == 5
        assert "online_return" not in _read(resumed / "train.csv")  # header rebuilt
        _run(logger, range(6, 11))
    for name in ("train.csv", "train.jsonl", "eval.csv", "eval.jsonl"):
        assert _read(resumed / name) == _read(full / name), name


def test_fresh_run_refuses_or_replaces_old_logs(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        logger.log(1, {"a": 1}, prefix="train")
        logger.log(1, {"b": 1}, prefix="old")
    before = {p: _read(tmp_path / p) for p in sorted(os.listdir(tmp_path))}
    with pytest.raises(FileExistsError, match=r"already holds logs \(old.jsonl, train.jsonl\)"):
        qlog.Logger(tmp_path)
    assert {p: _read(tmp_path / p) for p in sorted(os.listdir(tmp_path))} == before
    with qlog.Logger(tmp_path, overwrite=True) as logger:
        logger.log(1, {"c": 2}, prefix="train")
    assert _read(tmp_path / "train.csv") == "step,c\n1,2\n"
    assert not (tmp_path / "old.csv").exists() and not (tmp_path / "old.jsonl").exists()


def test_log_rejects_bad_input(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        with pytest.raises(ValueError, match="step"):
            logger.log(1, {"step": 3}, prefix="train")
        with pytest.raises(ValueError, match="prefix"):
            logger.log(1, {"a": 1}, prefix="../x")
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(2, {"a": 1}, prefix="train")


@pytest.mark.parametrize(
    "kwargs, blocked, package",
    [
        ({"tensorboard": True}, ("tensorboardX", "torch"), "pip install tensorboardX"),
        ({"wandb": True}, ("wandb",), "pip install wandb"),
    ],
)
def test_missing_optional_backend_is_a_clear_error(tmp_path, monkeypatch, kwargs, blocked, package):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(ImportError, match=package):
        qlog.Logger(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # failed before touching anything


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_reexported(tmp_path):
    """`qam.logging` re-exports the atomic writers of `qam._io` (tested in test_io.py)."""
    path = tmp_path / "sub" / "f.txt"
    qlog.atomic_write_text(path, "one\n")
    qlog.atomic_write_bytes(path, b"two\n")
    assert path.read_bytes() == b"two\n"
    assert os.listdir(tmp_path / "sub") == ["f.txt"]
    assert os.stat(path).st_mode & 0o044  # not mkstemp's private 0o600
    assert qlog.atomic_write_text is _io.atomic_write_text
    assert qlog.atomic_write_bytes is _io.atomic_write_bytes
