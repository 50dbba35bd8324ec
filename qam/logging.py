"""Run logging: CSV + JSONL logs, optional TensorBoard / W&B, a progress bar, a learning-curve
plot with the paper's curve beside ours, a one-screen summary, and atomic file writes.

Everything here is plain Python + NumPy; matplotlib (for `plot_learning_curve`), tqdm (for a
nicer `ProgressBar`), tensorboardX and wandb are optional and imported only when used.

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
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import reference as _reference


__all__ = [
    "Logger",
    "ProgressBar",
    "atomic_write_bytes",
    "atomic_write_text",
    "package_versions",
    "plot_learning_curve",
    "read_eval_curve",
    "summary",
    "to_python",
]

StrPath = str | os.PathLike

# The process umask, read once (the only portable way to read it is to set it).
_UMASK = os.umask(0)
os.umask(_UMASK)


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


# ------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: StrPath, data: bytes) -> None:
    """Write `data` to `path` atomically: readers see the old file or the new one, never a
    partial one, even if the process dies mid-write.

    Writes a temporary file in the same directory, flushes and `fsync`s it, then `os.replace`s
    it over `path`. Parent directories are created. The file gets the usual permissions
    (`0o666` minus the umask), not `mkstemp`'s `0o600`.

    **Arguments:**

    - `path`: the destination file.
    - `data`: the full new contents.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: StrPath, text: str, *, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` for text (`encoding`, default UTF-8; newlines written as given).

    **Arguments:**

    - `path`: the destination file.
    - `text`: the full new contents.
    - `encoding`: the text encoding.
    """
    atomic_write_bytes(path, text.encode(encoding))


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
        and its `<prefix>.csv`) are removed. An integer `S` resumes: rows with `step > S` are
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
    ):
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"`resume_step` must be >= 0 or None; got {resume_step}.")
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
        return sorted(
            name[: -len(".jsonl")]
            for name in os.listdir(self.run_dir)
            if name.endswith(".jsonl") and os.path.isfile(os.path.join(self.run_dir, name))
        )

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


# ------------------------------------------------------------------------- progress
def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _format_postfix(postfix: Mapping[str, Any]) -> str:
    parts = []
    for key, value in postfix.items():
        if key == "success" and isinstance(value, int | float):
            parts.append(f"success={100 * value:.1f}%")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """A training progress bar: steps, steps/s, ETA and the latest metrics (`success` as a
    percentage; each postfix value stays shown until it is updated).

    Uses `tqdm` when installed, otherwise prints a plain status line every `mininterval`
    seconds. To keep CI logs short, when the output is not a terminal the default `mininterval`
    is 60 s (0.5 s on a terminal).

    **Arguments:**

    - `total`: the step count at the end.
    - `initial`: the step count at the start (the resumed step); steps/s counts from here.
    - `disable`: print nothing.
    - `desc`: a label in front of the bar.
    - `mininterval`: seconds between refreshes; `None` for the default above.
    - `use_tqdm`: `None` to use tqdm if installed, `False` for the plain printer.
    - `file`: where to write (default `sys.stderr`).
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        disable: bool = False,
        desc: str | None = None,
        mininterval: float | None = None,
        use_tqdm: bool | None = None,
        file: Any = None,
    ):
        self.total = int(total)
        self.n = int(initial)
        self.initial = int(initial)
        self.disable = disable
        self.desc = desc
        self.file = sys.stderr if file is None else file
        if mininterval is None:
            mininterval = 0.5 if _is_tty(self.file) else 60.0
        self.mininterval = float(mininterval)
        self.postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last_print = self._start
        self._printed_n: int | None = None
        self._closed = False
        self._tqdm = None
        if use_tqdm is not False and not disable:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if use_tqdm:
                    raise ImportError(
                        "`use_tqdm=True` needs the `tqdm` package: pip install tqdm"
                    ) from None
            else:
                self._tqdm = tqdm(
                    total=self.total, initial=self.initial, desc=desc, unit="step",
                    unit_scale=self.total >= 100_000, dynamic_ncols=True, file=self.file,
                    mininterval=self.mininterval, maxinterval=max(10.0, self.mininterval),
                    smoothing=0.1,
                )  # fmt: skip

    @property
    def rate(self) -> float:
        """Steps per second since construction."""
        elapsed = time.monotonic() - self._start
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by `n` steps and update the shown metrics.

        **Arguments:**

        - `n`: steps done since the last update.
        - `**postfix`: metrics to show (`success` is a fraction in [0, 1], shown in percent);
            values are kept until replaced.
        """
        self.n += int(n)
        for key, value in postfix.items():
            value = to_python(value)
            self.postfix[key] = value
        if self.disable:
            return
        if self._tqdm is not None:
            if postfix:
                self._tqdm.set_postfix_str(_format_postfix(self.postfix), refresh=False)
            self._tqdm.update(int(n))
            return
        now = time.monotonic()
        if now - self._last_print >= self.mininterval or (self.n >= self.total > 0):
            self._print(now)

    def _line(self) -> str:
        rate = self.rate
        remaining = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        line = f"{self.n:,}/{self.total:,} steps ({pct:.0f}%) | {rate:.1f} steps/s | "
        line += f"ETA {_format_duration(remaining)}"
        if self.postfix:
            line += " | " + _format_postfix(self.postfix)
        return (f"{self.desc}: " if self.desc else "") + line

    def _print(self, now: float) -> None:
        if self._printed_n == self.n:
            return
        print(self._line(), file=self.file, flush=True)
        self._last_print = now
        self._printed_n = self.n

    def close(self) -> None:
        """Finish the bar (the plain printer writes a last line). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif not self.disable:
            self._print(time.monotonic())

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ------------------------------------------------------------------------- eval curves
def _number(value: Any) -> float | None:
    """A CSV cell or row value as a float; `None` when blank/missing."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return float(value)
    return float(to_python(value))


def read_eval_curve(
    evals: Sequence[Mapping[str, Any]] | StrPath, *, metric: str = "success"
) -> dict[str, np.ndarray]:
    """Our evaluation curve from `eval.csv` (or `eval.jsonl`), or from rows in memory.

    Rows without `metric` (e.g. a row holding only the behaviour-cloning policy's `bc_success`)
    are skipped; a later row at the same step replaces an earlier one.

    **Arguments:**

    - `evals`: a path to `eval.csv` / `eval.jsonl`, or rows: either flat (as logged, with
        `metric` and `metric/seed<i>` keys) or with `metric` as a per-seed list (as in the
        trainer's `evals`, `{"step": 5000, "success": [0.4, 0.6]}`).
    - `metric`: the metric to read.

    **Returns:**

    A dict with `steps` (`int64`, shape `(N,)`), `mean` (`(N,)`) and `per_seed` (`(N, S)`, NaN
    where a seed's value is missing), sorted by step; `S` is 0 when only means were logged.
    """
    rows = _load_rows(evals)
    by_step: dict[int, tuple[float, list[float]]] = {}
    for row in rows:
        value = row.get(metric)
        if value is None or value == "":
            continue
        step = int(float(row["step"]))
        if isinstance(value, list | tuple | np.ndarray | jax.Array) and np.ndim(value) > 0:
            seeds = [float(v) for v in np.asarray(to_python(value), np.float64).reshape(-1)]
            mean = float(np.mean(seeds))
        else:
            mean = _number(value)
            seeds = []
            i = 0
            while f"{metric}/seed{i}" in row:
                v = _number(row[f"{metric}/seed{i}"])
                seeds.append(math.nan if v is None else v)
                i += 1
        assert mean is not None
        by_step[step] = (mean, seeds)
    steps = sorted(by_step)
    width = max((len(by_step[s][1]) for s in steps), default=0)
    per_seed = np.full((len(steps), width), np.nan)
    for i, s in enumerate(steps):
        seeds = by_step[s][1]
        per_seed[i, : len(seeds)] = seeds
    return {
        "steps": np.asarray(steps, np.int64),
        "mean": np.asarray([by_step[s][0] for s in steps], np.float64),
        "per_seed": per_seed,
    }


def _load_rows(evals: Sequence[Mapping[str, Any]] | StrPath) -> list[Mapping[str, Any]]:
    if isinstance(evals, str | os.PathLike):
        path = os.fspath(evals)
        if path.endswith(".jsonl"):
            return [rec for _, rec in _read_jsonl(path)]
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return list(evals)


def _last_value(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[int, float] | None:
    """`(step, value)` of the last row with a non-blank `key`."""
    for row in reversed(rows):
        v = row.get(key)
        if v is not None and v != "":
            if isinstance(v, list | tuple):
                v = float(np.mean(v))
            return int(float(row["step"])), float(v)
    return None


def _paper_value(curve: Mapping[str, Any], step: int) -> tuple[float, float, float] | None:
    hits = np.nonzero(curve["steps"] == step)[0]
    if hits.size == 0:
        return None
    i = int(hits[0])
    return float(curve["mean"][i]), float(curve["ci_low"][i]), float(curve["ci_high"][i])


def plot_learning_curve(
    evals: Sequence[Mapping[str, Any]] | StrPath,
    out_path: StrPath,
    *,
    task: str,
    method: str,
    offline_steps: int,
    metric: str = "success",
    scale: float = 100.0,
    title: str | None = None,
    dpi: int = 120,
) -> dict[str, Any]:
    """Plot our learning curve, with the paper's for the same task and method, to a PNG.

    Our success rate: the mean over seeds (thick) and each seed (thin), with a dashed vertical
    line at the offline -> online boundary and, when logged, the behaviour-cloning flow policy's
    success (`bc_success`) as a marker at its step.

    The paper's curve (mean over its 12 seeds and 95% bootstrap band) is drawn when
    `qam.reference.paper_curve(task, method)` has one. Its schedule is 1M offline + 500K online
    steps. When `offline_steps` is also 1M the two curves share one axis; otherwise the paper's
    curve goes in a **second panel on its own axis** (same y-range), because stretching or
    shifting it onto a shorter schedule would pair our step t with a paper step that saw a
    different amount of training, which a side-by-side plot does not pretend.

    Written atomically; draws with matplotlib's Agg renderer directly (no pyplot, no display, the
    global backend untouched).

    **Arguments:**

    - `evals`: a path to `eval.csv` / `eval.jsonl`, or rows (see `read_eval_curve`).
    - `out_path`: the PNG to write.
    - `task`: the OGBench task (for the paper's curve and the title).
    - `method`: the agent (`qam`, `qam-fql`, `qam-edit` or a paper method name).
    - `offline_steps`: where our offline phase ends.
    - `metric`: the logged metric to plot.
    - `scale`: multiplies our values (default 100: logged success rates are fractions in [0, 1]
        and the paper's are percentages); use 1.0 if yours are percentages already.
    - `title`: the figure title (default: task and method).
    - `dpi`: resolution.

    **Returns:**

    A dict: `path` (the PNG), `panels` (1 or 2) and `paper` (whether the paper's curve is drawn).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise ImportError("plot_learning_curve needs matplotlib: pip install matplotlib") from None
    ours = read_eval_curve(evals, metric=metric)
    bc = _last_value(_load_rows(evals), "bc_" + metric)
    paper = _reference.paper_curve(task, method)
    paper_offline = _reference.PAPER_OFFLINE_STEPS
    shared = paper is not None and offline_steps == paper_offline
    panels = 2 if paper is not None and not shared else 1
    fig = Figure(figsize=(6.4 * panels, 4.2), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False, sharey=True)[0]
    ax = axes[0]
    steps = ours["steps"]
    for j in range(ours["per_seed"].shape[1]):
        ax.plot(steps, scale * ours["per_seed"][:, j], color="C0", lw=0.7, alpha=0.35,
                label="our seeds" if j == 0 else None)  # fmt: skip
    n_seeds = ours["per_seed"].shape[1]
    seeds_text = f", {n_seeds} seed{'s' if n_seeds != 1 else ''}" if n_seeds else ""
    marker = "o" if len(steps) < 30 else None
    ax.plot(steps, scale * ours["mean"], color="C0", lw=2.0, marker=marker, ms=3,
            label=f"ours ({method}{seeds_text})")  # fmt: skip
    if bc is not None:
        ax.plot([bc[0]], [scale * bc[1]], marker="X", ms=8, color="C2", ls="none",
                label="BC flow policy")  # fmt: skip
    ax.axvline(offline_steps, color="gray", ls="--", lw=1.0, label="offline → online")
    ax.set_title("this run" if panels == 2 else "")
    if paper is not None:
        pax = ax if shared else axes[1]
        pax.fill_between(paper["steps"], paper["ci_low"], paper["ci_high"], color="C1",
                         alpha=0.2, lw=0, label="paper 95% CI")  # fmt: skip
        pax.plot(paper["steps"], paper["mean"], color="C1", lw=2.0,
                 label=f"paper ({paper['method']}, {paper['seeds']} seeds)")  # fmt: skip
        if not shared:
            pax.axvline(paper_offline, color="gray", ls="--", lw=1.0, label="offline → online")
            pax.set_title("paper (1M offline + 500K online)")
            pax.set_xlim(0, int(paper["steps"].max()))
    for a in axes:
        a.xaxis.set_major_formatter(EngFormatter(sep=""))
        a.set_xlabel("steps")
        a.set_ylim(-2, 102)
        a.grid(alpha=0.3)
        a.legend(loc="best", fontsize=8)
    axes[0].set_ylabel(f"{metric} rate (%)" if scale == 100.0 else metric)
    right = max([offline_steps, *(int(s) for s in steps[-1:])])
    if shared and paper is not None:
        right = max(right, int(paper["steps"].max()))
    axes[0].set_xlim(0, right * 1.02)
    fig.suptitle(title or f"{task} — {method}", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(out_path, buffer.getvalue())
    return {"path": os.fspath(out_path), "panels": panels, "paper": paper is not None}


# ------------------------------------------------------------------------- summary
def _stats(values: Any, scale: float) -> dict[str, Any]:
    arr = scale * np.asarray(values, np.float64).reshape(-1)
    return {
        "mean": float(np.mean(arr)),
        "std": float(np.std(arr)),
        "per_seed": [float(v) for v in arr],
    }


def summary(
    run_dir: StrPath,
    *,
    task: str,
    method: str,
    seeds: Sequence[int],
    evals: Sequence[Mapping[str, Any]] | StrPath,
    offline_steps: int,
    online_steps: int,
    bc_success: Any = None,
    wall_time: float | None = None,
    metric: str = "success",
    scale: float = 100.0,
    write: bool = True,
) -> str:
    """A one-screen text summary of a run; also written to `run_dir/summary.txt` and (as data)
    `run_dir/summary.json`, atomically.

    Reports the task, agent, seeds and schedule; our success rate (in percent, mean ± std over
    seeds, `np.std` with `ddof=0`) at the end of the offline phase, at the end, and at its best
    evaluation; the behaviour-cloning flow policy's success if given; the paper's number (mean and
    95% CI) for the same task and method at its offline end (1M) and final (1.5M) step, when it
    has a curve; the wall time; and the files in `run_dir`.

    **Arguments:**

    - `run_dir`: the run directory.
    - `task`, `method`: the OGBench task and the agent (as for `plot_learning_curve`).
    - `seeds`: the seeds, in seed-axis order.
    - `evals`: the evaluations: the trainer's list (`{"step", "success": [per seed], ...}`),
        logged rows, or a path to `eval.csv` / `eval.jsonl`.
    - `offline_steps`, `online_steps`: the schedule.
    - `bc_success`: the BC flow policy's success per seed (or a mean), if evaluated.
    - `wall_time`: seconds the run took (this session), if known.
    - `metric`: the metric to summarise.
    - `scale`: as for `plot_learning_curve` (100: fractions shown as percentages).
    - `write`: write `summary.txt` / `summary.json` (default) or only return the text.

    **Returns:**

    The summary text.
    """
    run_dir = os.fspath(run_dir)
    curve = read_eval_curve(evals, metric=metric)
    n_seeds = len(seeds)

    def at(i: int) -> dict[str, Any]:
        row = curve["per_seed"][i]
        values = row[~np.isnan(row)]
        if values.size:
            stats = _stats(values, scale)
        else:  # only the mean was logged
            stats = {"mean": scale * float(curve["mean"][i]), "std": None, "per_seed": []}
        return {"step": int(curve["steps"][i]), **stats}

    record: dict[str, Any] = {
        "task": task,
        "method": method,
        "paper_method": _reference.canonical_method(method),
        "seeds": [int(s) for s in seeds],
        "offline_steps": int(offline_steps),
        "online_steps": int(online_steps),
        "metric": metric,
        "units": "percent" if scale == 100.0 else f"x{scale}",
        "wall_time_s": None if wall_time is None else float(wall_time),
        "offline_end": None,
        "final": None,
        "best": None,
        "bc": None,
        "paper": None,
    }
    if len(curve["steps"]):
        offline_hits = np.nonzero(curve["steps"] == offline_steps)[0]
        if offline_hits.size:
            record["offline_end"] = at(int(offline_hits[-1]))
        record["final"] = at(len(curve["steps"]) - 1)
        record["best"] = at(int(np.argmax(curve["mean"])))
    if bc_success is not None:
        record["bc"] = _stats(np.asarray(to_python(bc_success), np.float64), scale)
    paper = _reference.paper_curve(task, method)
    if paper is not None:
        paper_offline = _reference.PAPER_OFFLINE_STEPS
        paper_final = int(paper["steps"].max())
        points = {}
        for name, step in (("offline_end", paper_offline), ("final", paper_final)):
            value = _paper_value(paper, step)
            if value is not None:
                points[name] = {"step": step, "mean": value[0], "ci95": [value[1], value[2]]}
        record["paper"] = {"method": paper["method"], "seeds": paper["seeds"], **points}
    files = sorted(
        name + ("/" if os.path.isdir(os.path.join(run_dir, name)) else "")
        for name in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
        if not name.startswith(".") and not name.endswith(".tmp")
    )
    if write:
        files = sorted(set(files) | {"summary.txt", "summary.json"})
    record["files"] = files

    text = _summary_text(record, n_seeds)
    if write:
        atomic_write_text(os.path.join(run_dir, "summary.json"),
                          json.dumps(to_python(record), indent=2) + "\n")  # fmt: skip
        atomic_write_text(os.path.join(run_dir, "summary.txt"), text)
    return text


def _summary_text(r: Mapping[str, Any], n_seeds: int) -> str:
    unit = "%" if r["units"] == "percent" else ""
    total = r["offline_steps"] + r["online_steps"]
    paper_name = r["paper_method"]
    lines = [
        f"QAM run summary — {r['task']}",
        f"  agent      {r['method']}" + (f" (paper: {paper_name})" if paper_name else ""),
        f"  seeds      {' '.join(str(s) for s in r['seeds'])} ({n_seeds})",
        f"  steps      {r['offline_steps']:,} offline + {r['online_steps']:,} online = {total:,}",
    ]
    if r["wall_time_s"] is not None:
        lines.append(f"  wall time  {_format_duration(r['wall_time_s'])}")
    lines.append("")
    lines.append(f"{r['metric']} rate ({unit or r['units']}, mean ± std over seeds)")

    def fmt(label: str, s: Mapping[str, Any] | None, step: bool = True) -> None:
        if s is None:
            return
        head = f"  {label:<12}" + (f"(step {s['step']:>9,})  " if step else " " * 18)
        std = "" if s["std"] is None else f" ± {s['std']:.1f}"
        line = f"{head}{s['mean']:5.1f}{std}{unit}"
        if 1 < len(s["per_seed"]) <= 8:
            line += "   [" + " ".join(f"{v:.1f}" for v in s["per_seed"]) + "]"
        lines.append(line)

    fmt("offline end", r["offline_end"])
    fmt("final", r["final"])
    fmt("best", r["best"])
    fmt("BC flow", r["bc"], step=False)
    if r["final"] is None:
        lines.append("  (no evaluations)")
    paper = r["paper"]
    lines.append("")
    if paper is None:
        lines.append(f"paper: no curve for {r['task']} / {r['method']}")
    else:
        lines.append(f"paper ({paper['method']}, {paper['seeds']} seeds, mean [95% CI], "
                     "1M offline + 500K online)")  # fmt: skip
        for name, label in (("offline_end", "offline end"), ("final", "final")):
            p = paper.get(name)
            if p is not None:
                lo, hi = p["ci95"]
                lines.append(f"  {label:<12}(step {p['step']:>9,})  {p['mean']:5.1f}%"
                             f"   [{lo:.1f}, {hi:.1f}]")  # fmt: skip
        if r["offline_steps"] != _reference.PAPER_OFFLINE_STEPS:
            lines.append("  (our schedule differs from the paper's: compare by phase, not step)")
    lines.append("")
    lines.append("files: " + "  ".join(r["files"]))
    return "\n".join(lines) + "\n"
