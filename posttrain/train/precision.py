"""`precision: auto`: bf16 autocast where the hardware computes bf16 natively, else fp32.

The CPUs this project runs on differ: an Intel Xeon without AMX emulates bf16 (its bf16
matmul ran at ~1/5 of fp32), while an AMD EPYC with AVX512_BF16 ran bf16 at ~4x fp32 and
SmolLM2 SFT 2.3x faster. So the choice is made per machine, from two facts:

1. the CPU flags: `amx_bf16` or `avx512_bf16` (native bf16 dot products); on CUDA,
   `torch.cuda.is_bf16_supported()`;
2. a short matmul probe (fp32 vs bf16, n = 512, on the threads torch uses), cached per
   machine in the posttrain cache folder, so a run pays for it once.

`auto` picks bf16 when the flags say native *and* the probe measured bf16 at least
`BF16_MIN_SPEEDUP` times faster; otherwise fp32. bf16 here always means autocast with fp32
master weights and optimiser state. fp16 is refused on CPU (no fast fp16 kernels there and
the loss needs a scaler). `bf16` asked for where the hardware has no native bf16 runs, with
a warning giving the measured slowdown.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from posttrain.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_MIN_SPEEDUP = 1.2
"""bf16 must beat fp32 by this factor in the probe for `auto` to pick it (margin for the casts)."""
PROBE_N = 512


@dataclass(frozen=True)
class Probe:
    """One machine's bf16 facts: the CPU model and flags, and the probe's GFLOP/s."""

    cpu: str
    native_flags: tuple[str, ...]
    threads: int
    fp32_gflops: float
    bf16_gflops: float

    @property
    def speedup(self) -> float:
        return self.bf16_gflops / max(self.fp32_gflops, 1e-9)


@dataclass(frozen=True)
class Choice:
    """The precision a run uses, what was asked for, and why (printed and kept in run_meta.json)."""

    requested: str
    precision: str
    reason: str
    warn: bool = False
    """True when the choice is known to be slow here (bf16 asked for without native bf16)."""

    def to_metadata(self) -> dict:
        return asdict(self)


def cpu_info(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo (empty on other systems)."""
    if cpuinfo is None:
        return _this_cpu()
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    model = model or platform.processor() or "unknown CPU"
    return model, flags


@functools.cache
def _this_cpu() -> tuple[str, set[str]]:
    path = Path("/proc/cpuinfo")
    return cpu_info(path.read_text() if path.is_file() else "")


def matmul_gflops(dtype: torch.dtype, n: int = PROBE_N, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n matmul in `dtype` (one warm-up call first)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        a @ b
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _cache_file(cpu: str, flags: set[str], threads: int) -> Path:
    from posttrain.train.pretrain import cache_root

    key = f"{cpu}|{' '.join(sorted(flags))}|{threads}|{torch.__version__}"
    return cache_root() / "precision" / f"probe-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


_READ: dict[tuple[Path, int], Probe] = {}
"""Probes already read by this process, by cache file and its mtime (`autocast("auto")` may
resolve every step; a rewritten file is read again)."""


def probe_cpu(refresh: bool = False) -> Probe:
    """The machine's probe, measured once per (CPU, flags, threads, torch) and cached."""
    cpu, flags = cpu_info()
    threads = torch.get_num_threads()
    file = _cache_file(cpu, flags, threads)
    stamp = (file, file.stat().st_mtime_ns) if file.is_file() else None
    if stamp in _READ and not refresh:
        return _READ[stamp]
    if stamp is not None and not refresh:
        try:
            raw = json.loads(file.read_text())
            _READ[stamp] = Probe(**{**raw, "native_flags": tuple(raw["native_flags"])})
            return _READ[stamp]
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable cache entry is measured again
    probe = Probe(
        cpu=cpu,
        native_flags=tuple(f for f in NATIVE_BF16_FLAGS if f in flags),
        threads=threads,
        fp32_gflops=round(matmul_gflops(torch.float32), 1),
        bf16_gflops=round(matmul_gflops(torch.bfloat16), 1),
    )
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(probe)))
    tmp.replace(file)
    _READ[(file, file.stat().st_mtime_ns)] = probe
    return probe


def decide_cpu(requested: str, probe: Probe, key: str = "train.precision") -> Choice:
    """The CPU decision, a pure function of the request and the probe."""
    measured = (
        f"bf16 matmul {probe.bf16_gflops:.0f} vs fp32 {probe.fp32_gflops:.0f} GFLOP/s ({probe.speedup:.2f}x)"
    )
    native = ", ".join(probe.native_flags)
    if requested == "fp16":
        raise ConfigError(
            f"{key}: fp16 on CPU is not supported (no fast fp16 kernels; the loss needs a scaler)",
            fix=f"use {key}=auto (bf16 where the CPU has it natively, else fp32)",
        )
    if requested == "fp32":
        return Choice(requested, "fp32", "asked for")
    if requested == "bf16":
        if probe.native_flags and probe.speedup >= 1.0:
            return Choice(requested, "bf16", f"asked for; native ({native}), {measured}")
        return Choice(
            requested, "bf16",
            f"asked for, but this CPU has no native bf16 ({measured}): expect a {1 / max(probe.speedup, 1e-9):.1f}x "
            f"slowdown; {key}=auto would use fp32", warn=True,
        )  # fmt: skip
    if not probe.native_flags:
        return Choice(requested, "fp32", f"no {' or '.join(NATIVE_BF16_FLAGS)} on this CPU ({measured})")
    if probe.speedup < BF16_MIN_SPEEDUP:
        return Choice(requested, "fp32", f"native bf16 ({native}) but not faster here ({measured})")
    return Choice(requested, "bf16", f"native bf16 ({native}), {measured}")


def resolve(requested: str, device: torch.device | str, key: str = "train.precision") -> Choice:
    """The precision to use on `device` for a request of auto | fp32 | bf16 | fp16."""
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"{key}: unknown precision {requested!r}", fix="use auto, fp32, bf16 or fp16")
    device = torch.device(device)
    if device.type == "cuda":
        if requested != "auto":
            return Choice(requested, requested, "asked for")
        if torch.cuda.is_bf16_supported():
            return Choice(requested, "bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
        return Choice(requested, "fp32", f"{torch.cuda.get_device_name(device)} has no bf16")
    if device.type != "cpu":
        return Choice(requested, "fp32" if requested == "auto" else requested, f"{device.type}: no probe")
    if requested == "fp32":
        return Choice(requested, "fp32", "asked for")
    probe = probe_cpu()
    if probe.native_flags and probe.speedup < BF16_MIN_SPEEDUP:
        probe = probe_cpu(refresh=True)  # a cached reading taken on a busy machine is measured again
    return decide_cpu(requested, probe, key)


def autocast(precision: str, device: torch.device | str):
    """torch.autocast for a precision (fp32: a no-op context; auto is resolved first)."""
    if precision == "auto":
        precision = resolve(precision, device).precision
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def precast_linears(model: torch.nn.Module, precision: str) -> None:
    """Store a frozen model's ``nn.Linear`` weights and biases in the dtype autocast gives them at
    every forward under ``precision`` (bf16 / fp16; fp32: nothing to do). Under that autocast the
    numbers are the same, without the casts: autocast caches its copies only of tensors that
    require grad, so a frozen model's fp32 weights were cast again in every pass. A weight tied to
    the input embeddings gets its own copy (the embedding table stays fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            for name in ("weight", "bias"):
                if (p := getattr(module, name)) is not None:
                    setattr(module, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))
