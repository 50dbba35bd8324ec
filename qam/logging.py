"""Run logging: CSV + JSONL logs, optional TensorBoard / W&B, the package versions a run
records, and (re-exported from `qam._io`) atomic file writes. Reading, plotting and summarising
the logged evaluations is `qam.report`.

Everything here is plain Python + NumPy; tensorboardX and wandb are optional and imported only
when used.

**Per-seed convention.** Several seeds may train in one program, so metric values often carry a
leading seed axis. `Logger.log` writes such a value `x` of shape `(S, ...)` under key `k` as

- `k`: the mean over seeds (a float), then
- `k/seed0`, ..., `k/seed{S-1}`: the value of each seed, by **position** on the seed axis (map
    positions to seed numbers with the run's config). Trailing axes, if any, are averaged.

Scalars (Python, NumPy or JAX, 0-d arrays included) are written as one column. A value of shape
`(1,)` is a one-seed run: `k` and `k/seed0`. Nested mappings are flattened with `/`
(`{"q": {"mean": 1}}` -> `q/mean`).

**Resume.** `Logger(run_dir, resume_step=S)` keeps the rows with `step <= S` of every
`<prefix>.jsonl` log already in `run_dir` (and rebuilds the matching `<prefix>.csv` from them),
then appends. Because rows hold nothing but the step and the metrics (no wall-clock times), a run
interrupted after its checkpoint at step `S` and resumed from it ends with byte-identical CSV
and JSONL files to an uninterrupted run. `resume_step=None` starts the logs afresh.
"""

import csv
import dataclasses
import importlib.metadata
import io
import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ._io import atomic_write_bytes, atomic_write_text


__all__ = [
    "Logger",
    "atomic_write_bytes",
    "atomic_write_text",
    "package_versions",
    "to_python",
]

StrPath = str | os.PathLike

# The packages whose versions decide a run's numbers, recorded in every run's `config.json`.
RUN_PACKAGES = ("qam", "jax", "jaxlib", "equinox", "optax", "diffrax", "lineax", "numpy",
                "ogbench", "mujoco", "gymnasium")  # fmt: skip


def package_versions(packages: Iterable[str] = RUN_PACKAGES) -> dict[str, str]:
    """Python's and the installed packages' versions (`importlib.metadata`), `"not installed"`
    where a package is missing."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ------------------------------------------------------------------------- conversion
def _scalar(x: np.generic) -> Any:
    """One NumPy scalar as a plain Python value. Floats narrower than 64 bits are written with
    their shortest round-tripping decimal (`np.float32(0.1)` -> `0.1`, not
    `0.10000000149011612`)."""
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x) if x.dtype.itemsize >= 8 else float(str(x))
    if isinstance(x, np.str_):
        return str(x)
    if x.dtype.kind == "V":  # e.g. ml_dtypes.bfloat16 from JAX
        return float(str(np.float32(x)))
    return x.item()


def _as_numpy(value: Any) -> Any:
    """JAX arrays to NumPy (non-standard float dtypes such as bfloat16 to float32)."""
    if isinstance(value, jax.Array):
        value = np.asarray(value)
    if isinstance(value, np.ndarray | np.generic) and value.dtype.kind == "V":
        value = np.asarray(value, np.float32)
    return value


def to_python(value: Any) -> Any:
    """Convert a value to plain, JSON-serialisable Python.

    - `None`, `bool`, `int`, `float`, `str`: unchanged;
    - NumPy / JAX scalars and 0-d arrays: `bool`, `int` or `float` (float32 values with their
        shortest decimal, `0.1` rather than `0.10000000149011612`);
    - NumPy / JAX arrays, lists, tuples, sets: (nested) lists;
    - mappings: dicts with `str` keys; dataclass instances: their fields as a dict;
    - paths: `str`; anything else: `str(value)`.

    Non-finite floats stay `float("nan")` / `float("inf")` (Python's `json` writes them as `NaN`
    / `Infinity`).
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    value = _as_numpy(value)
    if isinstance(value, np.generic):
        return _scalar(value)
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return _scalar(value[()])  # pyright: ignore[reportArgumentType]
        return [to_python(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_python(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_python(dataclasses.asdict(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _flatten(key: str, value: Any, out: dict[str, Any]) -> None:
    """One metric into flat columns, following the per-seed convention of the module docs."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{key}/{k}", v, out)
        return
    value = _as_numpy(value)
    if isinstance(value, list | tuple):
        try:
            value = np.asarray(value)
        except ValueError:  # ragged
            out[key] = json.dumps(to_python(value))
            return
    if isinstance(value, np.ndarray) and value.ndim > 0:
        if value.dtype.kind not in "biuf":
            out[key] = json.dumps(to_python(value))
            return
        if value.shape[0] == 0:
            out[key] = None
            return
        per_seed = value.reshape(value.shape[0], -1)
        if per_seed.shape[1] != 1:
            per_seed = per_seed.mean(axis=1, dtype=np.float64)
        per_seed = per_seed.reshape(-1)
        mean = np.mean(per_seed, dtype=np.float64)
        if per_seed.dtype.kind == "f" and per_seed.dtype.itemsize < 8:
            mean = mean.astype(per_seed.dtype)  # as precise as the data, shortest decimal
        out[key] = _scalar(mean)
        for i, v in enumerate(per_seed):
            out[f"{key}/seed{i}"] = _scalar(v)
        return
    out[key] = to_python(value)


def _row_step(record: Mapping[str, Any]) -> int:
    return int(record["step"])


# ------------------------------------------------------------------------- optional backends
def _import_tensorboard() -> Any:
    """The `SummaryWriter` class of tensorboardX (or of PyTorch, if that is what is installed)."""
    try:
        from tensorboardX import SummaryWriter  # pyright: ignore

        return SummaryWriter
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter  # pyright: ignore

        return SummaryWriter
    except ImportError:
        raise ImportError(
            "`tensorboard=True` needs the `tensorboardX` package (or PyTorch), which is not "
            "installed: pip install tensorboardX"
        ) from None


def _import_wandb() -> Any:
    try:
        import wandb  # pyright: ignore
    except ImportError:
        raise ImportError(
            "`wandb=True` needs the `wandb` package, which is not installed: pip install wandb"
        ) from None
    return wandb


def require_backends(*, tensorboard: bool = False, wandb: bool = False) -> None:
    """Raise `ImportError` (naming the package and the pip command) if a requested optional
    logging backend is not installed; for checking before a run starts."""
    if tensorboard:
        _import_tensorboard()
    if wandb:
        _import_wandb()


# ------------------------------------------------------------------------- the logger
def _read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    """`(line, record)` pairs of a JSONL log; a torn last line (a crash mid-write) is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON: {line[:80]!r}") from None
    return out


def _csv_text(fieldnames: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), restval="",
                            lineterminator="\n")  # fmt: skip
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def _union_keys(records: Iterable[Mapping[str, Any]]) -> list[str]:
    keys = {"step": None}
    for record in records:
        keys.update(dict.fromkeys(record))
    return list(keys)


class _Stream:
    """The CSV and JSONL files of one prefix, open for appending."""

    def __init__(self, run_dir: str, prefix: str):
        self.csv_path = os.path.join(run_dir, prefix + ".csv")
        self.jsonl_path = os.path.join(run_dir, prefix + ".jsonl")
        self.fieldnames: list[str] = ["step"]
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if header:
                self.fieldnames = header
            else:
                atomic_write_text(self.csv_path, _csv_text(self.fieldnames, []))
        else:
            atomic_write_text(self.csv_path, _csv_text(self.fieldnames, []))
        self.csv_file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self.jsonl_file = open(self.jsonl_path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.fieldnames]
        if new:
            self._rewrite_header(self.fieldnames + new)
        csv.DictWriter(self.csv_file, fieldnames=self.fieldnames, restval="",
                       lineterminator="\n").writerow(row)  # fmt: skip
        self.csv_file.flush()
        self.jsonl_file.write(json.dumps(row) + "\n")
        self.jsonl_file.flush()

    def _rewrite_header(self, fieldnames: list[str]) -> None:
        """A new key: rewrite the CSV (atomically) with the wider header, old rows padded."""
        self.csv_file.close()
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        atomic_write_text(self.csv_path, _csv_text(fieldnames, rows))
        self.fieldnames = fieldnames
        self.csv_file = open(self.csv_path, "a", newline="", encoding="utf-8")

    def close(self) -> None:
        self.csv_file.close()
        self.jsonl_file.close()


def _existing_prefixes(run_dir: str) -> list[str]:
    return sorted(
        name[: -len(".jsonl")]
        for name in os.listdir(run_dir)
        if name.endswith(".jsonl") and os.path.isfile(os.path.join(run_dir, name))
    )


class Logger:
    """Logs metrics to `run_dir/<prefix>.csv` and `run_dir/<prefix>.jsonl` (always), and to
    TensorBoard and Weights & Biases when asked for.

    Each `log(step, metrics, prefix=...)` call is one row: `{"step": step, **flat_metrics}`, with
    values converted to plain Python and seed axes expanded as described in the module docs
    (`success` -> `success`, `success/seed0`, ...). The CSV header is the union of the keys seen
    so far, `step` first, then in order of first appearance; when a new key appears the CSV is
    rewritten (atomically) with the wider header, earlier rows left blank in the new columns. Both
    files are flushed after every row.

    Use as a context manager, or call `close()`.

    **Arguments:**

    - `run_dir`: the run directory (created if needed).
    - `resume_step`: `None` for a fresh run: existing logs in `run_dir` (every `<prefix>.jsonl`
        and its `<prefix>.csv`) are refused with `FileExistsError` naming them, or removed with
        `overwrite=True`. An integer `S` resumes: rows with `step > S` are
        dropped from every existing log (the JSONL is the source of truth; the CSV is rebuilt
        from it) and new rows are appended.
    - `tensorboard`: also write TensorBoard events to `run_dir/tensorboard` (needs
        `tensorboardX` or PyTorch). Scalars are named `<prefix>/<key>`.
    - `wandb`: also log to Weights & Biases (needs `wandb`). The W&B run id is kept in
        `run_dir/wandb_run_id.txt` so that a resumed run continues the same W&B run.
    - `wandb_project`: the W&B project.
    - `wandb_kwargs`: more keyword arguments for `wandb.init` (`entity`, `tags`, `mode`, ...).
    - `config`: the run's configuration, recorded by TensorBoard (as text) and W&B.

    **Raises:**

    `ImportError` naming the package and its `pip install` command when `tensorboard` or
    `wandb` is asked for but not installed (before any file is touched).
    """

    def __init__(
        self,
        run_dir: StrPath,
        *,
        resume_step: int | None = None,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "qam",
        wandb_kwargs: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ):
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"`resume_step` must be >= 0 or None; got {resume_step}.")
        if resume_step is None and not overwrite and os.path.isdir(run_dir):
            existing = [p + ".jsonl" for p in _existing_prefixes(os.fspath(run_dir))]
            if existing:
                raise FileExistsError(
                    f"`Logger(run_dir={os.fspath(run_dir)!r}, resume_step=None)`: the directory "
                    f"already holds logs ({', '.join(existing)}); pass `resume_step` to append "
                    "to them, `overwrite=True` to replace them, or use another directory."
                )
        # Fail on a missing optional package before touching any file.
        writer_cls = _import_tensorboard() if tensorboard else None
        wandb_module = _import_wandb() if wandb else None
        self.run_dir = os.fspath(run_dir)
        self.resume_step = resume_step
        os.makedirs(self.run_dir, exist_ok=True)
        self._streams: dict[str, _Stream] = {}
        self._closed = False
        for prefix in self.existing_prefixes():
            self._truncate(prefix, resume_step)
        config_py = None if config is None else to_python(config)
        self._tb = None
        if writer_cls is not None:
            purge = None if resume_step is None else resume_step + 1
            self._tb = writer_cls(os.path.join(self.run_dir, "tensorboard"), purge_step=purge)
            if config_py is not None and resume_step is None:
                text = "```\n" + json.dumps(config_py, indent=2) + "\n```"
                self._tb.add_text("config", text, 0)
        self._wandb = None
        if wandb_module is not None:
            id_path = os.path.join(self.run_dir, "wandb_run_id.txt")
            run_id = None
            if resume_step is not None and os.path.exists(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip() or None
            if run_id is None:
                run_id = wandb_module.util.generate_id()
                atomic_write_text(id_path, run_id + "\n")
            kwargs = {
                "project": wandb_project,
                "dir": self.run_dir,
                "id": run_id,
                "resume": "allow",
                "name": os.path.basename(os.path.abspath(self.run_dir)),
                "config": config_py,
            }
            kwargs.update(wandb_kwargs or {})
            self._wandb = wandb_module.init(**kwargs)

    def existing_prefixes(self) -> list[str]:
        """The prefixes with a JSONL log in `run_dir`, sorted."""
        return _existing_prefixes(self.run_dir)

    def _truncate(self, prefix: str, resume_step: int | None) -> None:
        jsonl = os.path.join(self.run_dir, prefix + ".jsonl")
        csv_path = os.path.join(self.run_dir, prefix + ".csv")
        if resume_step is None:
            for path in (jsonl, csv_path):
                if os.path.exists(path):
                    os.remove(path)
            return
        kept = [(line, rec) for line, rec in _read_jsonl(jsonl) if _row_step(rec) <= resume_step]
        records = [rec for _, rec in kept]
        atomic_write_text(jsonl, "".join(line + "\n" for line, _ in kept))
        atomic_write_text(csv_path, _csv_text(_union_keys(records), records))

    def log(self, step: int | np.integer, metrics: Mapping[str, Any], *, prefix: str) -> dict:
        """Write one row.

        **Arguments:**

        - `step`: the step (environment or gradient steps; the x-axis of every plot).
        - `metrics`: name -> value: Python / NumPy / JAX scalars, arrays with a leading seed axis
            (see the module docs), strings, `None`, or nested mappings. May not contain `step`.
        - `prefix`: the log's name (`"train"`, `"eval"`): a file-name stem without `/`.

        **Returns:**

        The row as written (a flat dict of plain Python values).
        """
        if self._closed:
            raise RuntimeError("this Logger is closed.")
        if not prefix or os.sep in prefix or "/" in prefix or prefix.startswith("."):
            raise ValueError(f"`prefix` must be a plain file-name stem; got {prefix!r}.")
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            key = str(key)
            if key == "step":
                raise ValueError("`metrics` may not contain the key 'step' (it is the row's key).")
            _flatten(key, value, row)
        stream = self._streams.get(prefix)
        if stream is None:
            stream = self._streams[prefix] = _Stream(self.run_dir, prefix)
        stream.write(row)
        numbers = {
            f"{prefix}/{k}": float(v)
            for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for name, v in numbers.items():
                self._tb.add_scalar(name, v, row["step"])
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=row["step"])
        return row

    def close(self) -> None:
        """Close the files (and the TensorBoard writer / W&B run). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for stream in self._streams.values():
            stream.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
