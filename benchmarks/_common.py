"""Shared helpers for the `qam` benchmarks (not part of the library).

- `parse_options`: a benchmark's command line from a dataclass of its options (`tyro`; each
  field's trailing comment is its `--help` line).
- `machine_info` / `format_machine_info`: the machine, JAX devices and package versions that
  every benchmark prints and stores beside its numbers.
- `time_calls`: median and inter-quartile range of repeated, blocked calls under a time budget.
- `compile_stats`: XLA's static memory analysis (a peak-memory estimate on every backend) and
  FLOP count of a compiled computation; `device_peak_bytes`: the allocator's measured peak where
  the backend reports one (GPU).
- `CompileCounter`: counts XLA backend compilations, to show that nothing recompiles.
- `write_json_atomic` / `write_text_atomic` / `markdown_table`: result files, written to a
  temporary file and moved into place with `os.replace`.

Import JAX lazily (inside the functions) so that a benchmark can set `jax_platforms` from its
command line before any backend starts.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any


DEFAULT_PACKAGES = ("jax", "jaxlib", "equinox", "diffrax", "lineax", "optax", "numpy", "qam")


def parse_options(options_class: type, argv: Sequence[str] | None = None, *, prog: str) -> Any:
    """`options_class` (a dataclass) filled from `argv` (default `sys.argv[1:]`) with `tyro`:
    one `--field-name` flag per field (hyphens), documented by the field's comment, with its
    default; the class docstring is the description. `--help` prints them and exits."""
    import inspect

    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    description = " ".join(inspect.cleandoc(options_class.__doc__ or "").split())
    return tyro.cli(
        options_class, args=args, prog=prog, description=description, use_underscores=False
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def package_versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Installed versions (`importlib.metadata`), `"not installed"` where missing."""
    from qam.logging import package_versions as versions

    return versions(packages)


def machine_info(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """The machine, the JAX backend and devices, and package versions, as a JSON-able dict."""
    import jax

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gib": _total_memory_gib(),
        "backend": jax.default_backend(),
        "devices": [
            f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in devices
        ],
        "versions": package_versions(packages),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "argv": [os.path.basename(sys.executable), *sys.argv],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_machine_info(info: dict[str, Any]) -> str:
    """A few human-readable lines for `machine_info()`."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return "\n".join(
        [
            f"machine : {info['cpu']}, {info['cpus_usable']} usable of {info['cpu_count']} CPUs, "
            f"{info['memory_gib']} GiB RAM; {info['platform']}",
            f"load    : {info['load_average_1_5_15']} (1/5/15-min load average at start)",
            f"device  : backend={info['backend']}; {', '.join(info['devices'])}",
            f"versions: {versions}",
            f"command : {' '.join(info['argv'])}",
            f"date    : {info['date_utc']}",
        ]
    )


def device_tag() -> str:
    """A short file-name-safe name of the default device: `cpu`, `gpu-nvidia-h100-80gb-hbm3`..."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    kind = getattr(jax.devices()[0], "device_kind", "")
    return re.sub(r"[^a-z0-9]+", "-", f"{backend} {kind}".lower()).strip("-")


def block(tree: Any) -> Any:
    """`jax.block_until_ready` on every array of `tree` (non-arrays are ignored)."""
    import jax

    return jax.block_until_ready(tree)


def time_calls(
    fn: Callable[[], Any],
    *,
    repeats: int,
    min_repeats: int = 1,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Time `fn()` (blocked until ready) up to `repeats` times.

    Stops early, after at least `min_repeats` calls, once the calls so far have taken
    `max_seconds`. Call `fn` once beforehand yourself to warm it up. Returns the times in
    seconds with their median, inter-quartile range, min and count.
    """
    times: list[float] = []
    spent = 0.0
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        block(fn())
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if max_seconds is not None and len(times) >= min_repeats and spent >= max_seconds:
            break
    return summarize(times)


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles (inclusive method), min and count of a list of times."""
    times = list(times)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return {
        "median_s": statistics.median(times),
        "q1_s": q1,
        "q3_s": q3,
        "iqr_s": q3 - q1,
        "min_s": min(times),
        "n": len(times),
        "times_s": times,
    }


def compile_stats(compiled: Any) -> dict[str, Any]:
    """Static statistics of a compiled computation (`jax.stages.Compiled`, or a wrapper with a
    `.compiled` attribute such as Equinox's).

    `peak_estimate_bytes = argument + output + temp - alias` from XLA's buffer assignment: the
    memory the executable needs while it runs (weights and inputs included). `flops` is XLA's
    cost-analysis count (`None` where the backend does not report it).
    """
    compiled = getattr(compiled, "compiled", compiled)
    out: dict[str, Any] = {}
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        mem = None
    if mem is not None:
        fields = (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        )
        for name in fields:
            out[name] = int(getattr(mem, name, 0) or 0)
        out["peak_estimate_bytes"] = (
            out["argument_size_in_bytes"]
            + out["output_size_in_bytes"]
            + out["temp_size_in_bytes"]
            - out["alias_size_in_bytes"]
        )
    else:
        out["peak_estimate_bytes"] = None
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = cost.get("flops") if isinstance(cost, dict) else None
    out["flops"] = float(flops) if flops is not None and math.isfinite(flops) else None
    return out


def matmul_flops(jaxpr: Any) -> float:
    """FLOPs of the matrix products (`dot_general`) in a (closed) jaxpr, counting each `scan`
    body `length` times and the costliest branch of a `cond`; a `while` body counts once.

    XLA's `cost_analysis()` counts a loop body once whatever its trip count, so it undercounts
    every `lax.scan`; this count does not (it ignores elementwise work, which is small next to
    the products for MLPs)."""
    from jax.extend import core as jex_core

    closed_types = (jex_core.ClosedJaxpr,)
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, closed_types) else jaxpr

    def sub(value: Any) -> float:
        if isinstance(value, closed_types):
            return matmul_flops(value.jaxpr)
        if isinstance(value, jex_core.Jaxpr):
            return matmul_flops(value)
        if isinstance(value, (tuple, list)) and value:
            counts = [sub(v) for v in value]
            return max(counts)  # `cond` branches: the costliest one
        return 0.0

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            free = math.prod(d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch))
            total += 2.0 * math.prod(lhs) * free
            continue
        inner = sum(sub(v) for v in eqn.params.values())
        total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def device_peak_bytes(device: Any = None) -> int | None:
    """The allocator's measured peak (`memory_stats()['peak_bytes_in_use']`) of `device`, or
    `None` where the backend does not track it (CPU). It is a process-wide maximum that cannot
    be reset, so it only bounds the peak of the largest computation run so far."""
    import jax

    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


class CompileCounter:
    """Counts XLA backend compilations (JAX's `backend_compile_duration` monitoring event).

    One listener is registered per process; read `CompileCounter.count()` before and after a
    block of calls to see how many compilations happened in between.
    """

    _count = 0
    _registered = False

    @classmethod
    def install(cls) -> None:
        if cls._registered:
            return
        import jax

        def listener(event: str, duration: float, **kwargs: Any) -> None:
            del duration, kwargs
            if event.endswith("backend_compile_duration"):
                cls._count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        cls._registered = True

    @classmethod
    def count(cls) -> int:
        return cls._count


def _write_atomic(path: str, data: str) -> None:
    from qam._io import atomic_write_text

    atomic_write_text(path, data)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically (temporary file + `os.replace`)."""
    _write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically (temporary file + `os.replace`)."""
    _write_atomic(path, text)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are converted with `str`."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
