"""Fused C++ kernels on CPU (``csrc/cpu_kernels.cpp``): the rollout engine's decode step and the
training forward/backward of RMSNorm and SiLU * up.

Why: with the weights packed (`posttrain.rollout.fused`), a SmolLM2 decode step of 32 rows at a
100-token context still spent ~8 ms of ~37 in some 25 small PyTorch ops a layer (RMSNorm 50 us a
call, RoPE, casts, SiLU, residual adds, cache writes) and ~10 ms in attention (Intel Xeon with AMX,
bf16 weights, measured per section). In training, RMSNorm and SiLU * up are ~8 ops each way
(`posttrain.models.fused_ops` says how much they cost). Each kernel does a group in one pass:

- decode: `add_rms_norm_` (the residual add and the next RMSNorm, x updated in place),
  `silu_mul` (from the fused gate/up projection), `rope_kv_` (RoPE of q and k, k and v written into
  the reserved cache's next column, q scaled), `decode_attention` (one query token per row; each
  cached key and value row read once for all the query heads that share it);
- training: `rms_norm_fwd` / `rms_norm_bwd` and `silu_mul_fwd` / `silu_mul_bwd`.

Arithmetic is fp32 whatever the storage dtype, as in PyTorch's ops; results differ from theirs by
summation order and, in bf16, by one rounding where PyTorch rounds twice (the tests say how much).

Built on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and the Python headers;
about 20 s once, then loaded from the build cache, ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). The build's name hashes the source, the compiler flags, the torch
version and the CPU's flags, so a changed CPU (``-march=native``) or source builds anew. Where the
build fails (no compiler), `load` returns None, `reason` says why, a warning is logged once, and
PyTorch's ops run instead: slower, the same results. ``POSTTRAIN_CPU_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
FUNCTIONS = [
    "add_rms_norm_", "silu_mul", "rope_kv_", "decode_attention",
    "decode_attention_vectorized", "sample_softmax",  # decode
    "rms_norm_fwd", "rms_norm_bwd", "silu_mul_fwd", "silu_mul_bwd",  # training
]  # fmt: skip
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
ENV_SWITCH = "POSTTRAIN_CPU_KERNELS"

log = logging.getLogger(__name__)
_module: Any = None
reason: str | None = None
"""Why the kernels are not in use (None while they are, or before the first `load`)."""


def cpu_flags() -> str:
    """The CPU's model name and feature flags (`posttrain.train.precision.cpu_info`)."""
    from posttrain.train.precision import cpu_info

    model, flags = cpu_info()
    return " ".join([model, *sorted(flags)])


def build_name(source: str) -> str:
    """The extension's name: changes with the source, flags, torch version and CPU."""
    key = "\n".join([source, " ".join(CFLAGS), torch.__version__, cpu_flags()])
    return "posttrain_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def built(name: str) -> bool:
    """Whether the extension ``name`` is already built in torch's extension cache (then `load`
    only loads it, quietly)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # a private helper: when it moves, say "loading" as before
        return False


def load() -> Any:
    """The built kernels module, or None (`reason` says why); builds once per process and machine."""
    global _module, reason
    if _module is not None or reason is not None:
        return _module
    if os.environ.get(ENV_SWITCH, "1") == "0":
        reason = f"{ENV_SWITCH}=0"
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        source = SOURCE.read_text()
        name = build_name(source)
        if not built(name):  # every process loads them: only a build is worth a line
            log.info("posttrain: building the fused CPU kernels (once per machine and version: ~20 s)")
        _module = load_inline(
            name,
            cpp_sources=[source],
            functions=FUNCTIONS,
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as err:  # a missing compiler or headers: decode with PyTorch ops instead
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        log.warning(
            "posttrain: the fused CPU kernels did not build (%s); decoding and training use PyTorch's ops "
            "instead (slower, the same results). Install g++ and the Python headers to use them.",
            reason,
        )
        return None
    return _module
