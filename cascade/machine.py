"""What this machine's CPU can do, and the bfloat16 autocast choice that follows from it.

Machines of the same kind differ from run to run (one CPU has AMX, the next only avx512_bf16, another neither), so
nothing here assumes a peak: :func:`machine_record` says what the CPU and torch report (written into every step
manifest and benchmark result), :func:`resolve_autocast` turns ``autocast = "auto" | "bf16" | "off"`` into float32
or bfloat16 for one model, and :func:`machine_bounds` measures the rates the benchmarks report their results
against.

"auto" picks bfloat16 only where the CPU runs it natively (avx512_bf16 or AMX, as torch reports them) AND a short
probe is at least :data:`MIN_BF16_SPEEDUP` times faster under bfloat16 autocast than in float32; elsewhere float32.
Training probes the model's own largest GEMM; scoring probes the model's whole forward at the size of its passes
(:func:`cascade.models.scoring.ranker_scorer`). A probe is measured once per machine, thread count and shape and
kept (:mod:`cascade.kept_probes`): runs on one machine then choose alike, where a probe near the threshold read
afresh would flip with the machine's load.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cascade.kept_probes import kept_speedup
from cascade.threads import torch_threads

log = logging.getLogger(__name__)

AUTOCAST = ("auto", "bf16", "off")
#: "auto" takes bfloat16 when its probed GEMM is at least this much faster than float32: below it the rounding of
#: activations to 8 bits of mantissa is not worth buying
MIN_BF16_SPEEDUP = 1.25
NATIVE_BF16_ENV = "CASCADE_NATIVE_BF16"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def read_cpuinfo(p: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str] | None]:
    """(model name, flags) of the first CPU in ``p``; (None, None) where there is none (not Linux)."""
    if not p.exists():
        return None, None
    model, flags = None, None
    for line in p.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:  # Features: arm64
            flags = set(value.split())
    return model, flags


def _torch_cpu(name: str) -> bool | None:
    """torch.cpu._is_<name>_supported() where this torch has it, else None (unknown)."""
    fn = getattr(torch.cpu, f"_is_{name}_supported", None)
    return bool(fn()) if fn is not None else None


@functools.cache
def cpu_capability() -> dict:
    """The CPU as /proc/cpuinfo and torch see it. flags: name -> True/False, or None where unknown (no
    /proc/cpuinfo). torch: torch's dispatch level (``get_cpu_capability``: "AVX512", "AVX2", ...) and its own
    checks of avx512_bf16 / AMX tiles; ``mkldnn_bf16`` is oneDNN's bf16 support, which includes emulation on any
    avx512 CPU, so it does not mean native bf16."""
    model, flags = read_cpuinfo()
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown",
        "logical_cores": os.cpu_count(),
        "flags": {f: (None if flags is None else f in flags) for f in CPU_FLAGS},
        "torch": {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": _torch_cpu("avx512_bf16"),
            "amx_tile": _torch_cpu("amx_tile"),
            "mkldnn_bf16": bool(mkldnn_bf16()) if mkldnn_bf16 is not None else None,
        },
    }


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def machine_record() -> dict:
    """:func:`cpu_capability` plus the library versions and torch's thread counts now (JSON-serialisable)."""
    rec = dict(cpu_capability())
    rec["versions"] = {"torch": torch.__version__, "numpy": np.__version__,
                       "faiss": _version("faiss-cpu") or _version("faiss-gpu-cu12")}
    rec["threads"] = {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads()}
    return rec


def native_bf16() -> tuple[bool, str]:
    """(whether the CPU runs bfloat16 GEMMs natively, the evidence): avx512_bf16 or AMX tiles as torch reports them,
    or as /proc/cpuinfo does where this torch cannot say. The environment variable ``CASCADE_NATIVE_BF16`` = "0" or
    "1" overrides the detection (the test suite sets "0", so its results do not depend on the machine)."""
    env = os.environ.get(NATIVE_BF16_ENV)
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"{NATIVE_BF16_ENV}={env!r} must be '0' or '1' (or unset: detect)")
        return env == "1", f"{NATIVE_BF16_ENV}={env}"
    cap = cpu_capability()
    t, f = cap["torch"], cap["flags"]
    avx = t["avx512_bf16"] if t["avx512_bf16"] is not None else f["avx512_bf16"]
    amx = t["amx_tile"] if t["amx_tile"] is not None else f["amx_bf16"]
    return bool(avx or amx), f"avx512_bf16={avx}, amx={amx}"


def best_seconds(fn, repeats: int) -> float:
    """The best wall seconds of ``repeats`` calls of ``fn()`` after one warm-up call."""
    return best_seconds_alternating([fn], repeats)[0]


def best_seconds_alternating(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """The best wall seconds of each of ``fns`` over ``repeats`` rounds that call them in turn, after one warm-up
    round (first-call allocation and oneDNN kernel selection): a load that comes and goes on a shared machine then
    falls on each of them alike, so their ratio holds where separate timings of each would not."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@functools.cache
def _probe(rows: int, k: int, n: int, threads: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    with torch.inference_mode():
        def f32():
            nn.functional.linear(x, w)

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                nn.functional.linear(x, w)

        t_f32, t_bf16 = best_seconds_alternating([f32, bf16], repeats)
        return t_f32 / t_bf16


def bf16_speedup(rows: int, k: int, n: int, repeats: int = 9) -> float:
    """float32 time / bfloat16-autocast time of ``linear(x [rows, k], w [n, k])`` on torch's current threads, best
    of ``repeats`` rounds that time the two in turn (the autocast side includes casting x and w, as a model's
    forward does). Cached per shape and thread count."""
    return _probe(rows, k, n, torch.get_num_threads(), repeats)


def largest_gemm(model: nn.Module, rows: int) -> tuple[int, int, int] | None:
    """(rows, in_features, out_features) of the model's largest nn.Linear (by weight size), None if it has none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    big = max(linears, key=lambda m: m.in_features * m.out_features)
    return rows, big.in_features, big.out_features


@dataclass(frozen=True)
class AutocastChoice:
    """requested: "auto" | "bf16" | "off". dtype: "bf16" or "float32", what runs. reason: why, in words (the flags
    and the probed speed-up). speedup: the probe's float32 / bf16 time, None where no probe ran."""

    requested: str
    dtype: str
    reason: str
    speedup: float | None = None

    @property
    def bf16(self) -> bool:
        return self.dtype == "bf16"

    def to_dict(self) -> dict:
        return asdict(self)


def check_autocast(value, where: str) -> str:
    """``value`` as one of :data:`AUTOCAST` (None is "off", as configs wrote it before "auto"); a ValueError naming
    ``where`` and the value otherwise."""
    if value is None:
        return "off"
    if value not in AUTOCAST:
        raise ValueError(f"{where}: autocast {value!r} must be one of {AUTOCAST} (or None: 'off')")
    return value


_logged: set[tuple] = set()


def _log_once(level: int, msg: str, *args) -> None:
    if (msg, args) not in _logged:
        _logged.add((msg, args))
        log.log(level, msg, *args)


def _threads() -> str:
    """torch's thread count in words ("1 thread", "2 threads")."""
    t = torch.get_num_threads()
    return f"{t} thread{'' if t == 1 else 's'}"


def probe_speedup(what: str, measure: Callable[[], float]) -> tuple[float, str | None]:
    """(float32 time / bf16 time, when it was measured or None) of the probe ``what`` on torch's current thread
    count: measured once per machine (CPU model, flags, torch version) and kept (:func:`kept_speedup`)."""
    cap = cpu_capability()
    flags = ",".join(f for f, on in cap["flags"].items() if on)
    key = f"{cap['cpu_model']} [{flags}] torch {torch.__version__}, {_threads()}: {what}"
    return kept_speedup(key, measure)


def resolve_autocast(autocast, device_type: str = "cpu", gemm: tuple[int, int, int] | None = None,
                     what: str = "model", probe: tuple[str, Callable[[], float]] | None = None) -> AutocastChoice:
    """Whether to run ``what`` (a model's training forward or its scoring) under bfloat16 autocast.

    autocast: "auto" | "bf16" | "off" (None: "off"). device_type: "cuda" keeps its own path: "bf16" runs CUDA
    bf16 autocast, "auto" float32 (the CPU probe says nothing about a GPU). gemm: (rows, k, n) of the model's
    largest GEMM (:func:`largest_gemm`), the shape "auto" probes; None (no GEMM): float32. probe: instead of
    gemm, (what it times, a function -> float32 time / bf16 time), called only where "auto" needs it and this
    machine has not kept its value (:func:`probe_speedup`; e.g. the model's whole forward:
    :func:`cascade.models.scoring.scoring_autocast`, whose name says the architecture). The choice is logged once
    per process; an explicit "bf16" without native support logs a warning (torch emulates it, slowly).
    """
    if gemm is not None and probe is not None:
        raise ValueError("resolve_autocast: give gemm or probe, not both")
    if gemm is not None:
        probe = (f"GEMM {gemm[0]}x{gemm[1]}x{gemm[2]}", lambda: bf16_speedup(*gemm))
    autocast = check_autocast(autocast, what)
    if autocast == "off":
        return AutocastChoice("off", "float32", "autocast off")
    if device_type != "cpu":
        if autocast == "bf16":
            return AutocastChoice("bf16", "bf16", f"bf16 requested on {device_type}")
        return AutocastChoice("auto", "float32", f"auto on {device_type}: float32 (the CPU probe does not apply)")
    native, flags = native_bf16()
    if autocast == "bf16":
        if not native:
            _log_once(logging.WARNING, "%s: autocast 'bf16' on a CPU without native bf16 (%s): torch emulates it, "
                      "expect it slower than float32", what, flags)
        return AutocastChoice("bf16", "bf16", f"bf16 requested ({flags})")
    if not native:
        choice = AutocastChoice("auto", "float32", f"no native bf16 ({flags})")
    elif probe is None:
        choice = AutocastChoice("auto", "float32", f"no GEMM to speed up ({flags})")
    else:
        s, measured = probe_speedup(probe[0], probe[1])
        s = round(s, 3)
        verdict = "bf16" if s >= MIN_BF16_SPEEDUP else "float32"
        kept = "" if measured is None else f"; probed {measured}, kept"
        choice = AutocastChoice("auto", verdict, f"{flags}; {probe[0]} on {_threads()} bf16 "
                                f"{s:.2f}x float32 ({'>=' if verdict == 'bf16' else '<'} {MIN_BF16_SPEEDUP}{kept})", s)
    _log_once(logging.INFO, "%s: autocast auto -> %s (%s)", what, choice.dtype, choice.reason)
    return choice


def gemm_rates(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of ``torch.matmul`` of two [n, n] matrices of ``dtype`` on torch's current threads (2 n^3 flops
    each), after one warm-up call: {"median_gflops", "best_gflops"} over ``repeats`` calls."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    times = []
    with torch.inference_mode():
        torch.matmul(a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"median_gflops": flops / float(np.median(times)) / 1e9, "best_gflops": flops / min(times) / 1e9}


def gemm_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """The best GFLOP/s of :func:`gemm_rates`."""
    return gemm_rates(dtype, n, repeats)["best_gflops"]


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """GB/s of a numpy copy of a ``mib`` MiB float32 array into another (bytes read + written), best of
    ``repeats``: well past every cache level, so DRAM bandwidth."""
    src = np.ones(mib * 2 ** 20 // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: np.copyto(dst, src), repeats) / 1e9


def machine_bounds(threads: int = 1, n: int = 1024, repeats: int = 5) -> dict:
    """The rates results are stated against, measured now on ``threads`` torch threads: float32 and bfloat16 GEMM
    GFLOP/s (n^3 matmul), memory bandwidth GB/s, whether AMX is present, and the CPU (:func:`cpu_capability`)."""
    with torch_threads(threads):
        f32 = gemm_gflops(torch.float32, n, repeats)
        bf16 = gemm_gflops(torch.bfloat16, n, repeats)
    cap = cpu_capability()
    amx = cap["torch"]["amx_tile"] if cap["torch"]["amx_tile"] is not None else cap["flags"]["amx_bf16"]
    return {"threads": threads, "float32_gflops": round(f32, 1), "bf16_gflops": round(bf16, 1),
            "memory_gbs": round(memory_bandwidth_gbs(repeats=repeats), 1), "amx": amx,
            "native_bf16": native_bf16()[0], "cpu_model": cap["cpu_model"]}


def format_bounds(b: dict) -> str:
    """One line naming the machine and its measured bounds."""
    return (f"{b['cpu_model']}: float32 GEMM {b['float32_gflops']:,.0f} GFLOP/s, bf16 GEMM "
            f"{b['bf16_gflops']:,.0f} GFLOP/s ({b['threads']} thread{'s' if b['threads'] > 1 else ''}; native bf16 "
            f"{b['native_bf16']}, AMX {b['amx']}), memory {b['memory_gbs']:.0f} GB/s")
