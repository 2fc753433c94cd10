"""Fused RMSNorm and SiLU-gated MLP for Llama-family models on CPU, forward and backward.

Why: a SmolLM2-135M training step (16 x 92 tokens, bf16 autocast, Intel Xeon with AMX) spent
1.77 s, of which the RMSNorms (~8 ops forward, as many backward, in fp32, and the bf16 copies that
each of the 5 projections after a norm makes of its output) and SiLU * up took up to 0.23 s: a
step with those parts removed ran in 1.54 s. The C++ kernels of `posttrain.models.cpu_kernels`
do each in one pass a direction:

- `RMSNormFunction`: HF's ``LlamaRMSNorm`` (fp32 statistics; h rounded to the input's dtype
  before the weight), its output in a chosen dtype. A decoder layer's two norms feed only linear
  projections, so under bf16 autocast they emit bf16, the very values those projections' autocast
  would have cast them to; the model's final norm keeps HF's dtype (heads and losses read it).
- `SiluMulFunction`: ``silu(gate) * up``, one rounding instead of two in bf16, two tensors saved
  for backward instead of three.

`install` swaps the modules of a loaded model in place (class swap: state dicts, PEFT, deepcopy
and ``save_pretrained`` see the same modules); `posttrain.models.load.load_model` calls it on CPU.
Forward-only passes (reference, old log-probs, scoring) run the same code as training, so they give
the training forward's numbers. Where the kernels did not build (`cpu_kernels.reason`) or
``POSTTRAIN_CPU_KERNELS=0``, nothing is swapped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from posttrain.models import cpu_kernels

NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm")
"""RMSNorms computing ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` (not Gemma's 1 + w)."""
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "MistralMLP", "Qwen3MLP")
"""MLPs computing ``down(act(gate(x)) * up(x))``; swapped only when the act is SiLU."""
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
"""Norms whose only consumers are linear projections: they emit autocast's dtype."""


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm(x) * weight with its output in ``out_dtype``; fp32 statistics and gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        x = x.contiguous()
        out, rstd = cpu_kernels.load().rms_norm_fwd(x, weight.contiguous(), eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = cpu_kernels.load().rms_norm_bwd(grad.contiguous(), x, weight.contiguous(), rstd)
        return grad_x, grad_w.to(weight.dtype), None, None


class SiluMulFunction(torch.autograd.Function):
    """silu(gate) * up of two tensors of one shape and dtype."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return cpu_kernels.load().silu_mul_fwd(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = cpu_kernels.load().silu_mul_bwd(grad.contiguous(), gate, up)
        return grad_gate, grad_up


def fusable(*tensors: torch.Tensor) -> bool:
    """CPU tensors of fp32 or bf16: what the kernels take."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)


def norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """A swapped RMSNorm's forward: HF's result dtype, or autocast's for a decoder layer's norms."""
    if not fusable(hidden_states, self.weight):
        return super(type(self), self).forward(hidden_states)
    out_dtype = torch.promote_types(self.weight.dtype, hidden_states.dtype)
    if self._posttrain_emits_autocast and torch.is_autocast_enabled("cpu"):
        out_dtype = torch.get_autocast_dtype("cpu")
    return RMSNormFunction.apply(hidden_states, self.weight, float(self.variance_epsilon), out_dtype)


def mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """A swapped MLP's forward: down(silu(gate(x)) * up(x)) with the fused product."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype or gate.shape != up.shape or not fusable(gate, up):
        return self.down_proj(F.silu(gate) * up)
    return self.down_proj(SiluMulFunction.apply(gate, up))


_SWAPPED: dict[type, type] = {}
FAMILIES = {"Llama": "llama", "Qwen2": "qwen2", "Mistral": "mistral", "Qwen3": "qwen3"}
"""Class-name prefix -> transformers' model folder, to find a swapped class's base by name."""


def swapped_class(cls: type, forward: Any) -> type:
    """A subclass of ``cls`` with ``forward`` (one per class), also a module attribute of its name,
    so that pickle finds it (``torch.save(model)``)."""
    if cls not in _SWAPPED:
        name = f"Fused{cls.__name__}"
        _SWAPPED[cls] = type(name, (cls,), {"forward": forward, "__module__": __name__})
        globals()[name] = _SWAPPED[cls]
    return _SWAPPED[cls]


def __getattr__(name: str) -> type:
    """``Fused<HF class>`` on demand: a process that unpickles a swapped model builds its class."""
    base = name.removeprefix("Fused")
    family = next((f for prefix, f in FAMILIES.items() if base.startswith(prefix)), None)
    if name.startswith("Fused") and family and base in NORM_CLASSES + MLP_CLASSES:
        import importlib

        cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), base)
        return swapped_class(cls, norm_forward if base in NORM_CLASSES else mlp_forward)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_silu(module: Any) -> bool:
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    return act in ("silu", "swish")


def install(model: torch.nn.Module) -> int:
    """Swap ``model``'s Llama-family RMSNorms and SiLU MLPs for the fused ones, in place; returns
    how many modules were swapped (0 where the kernels did not build)."""
    if cpu_kernels.load() is None:
        return 0
    count = 0
    for name, module in model.named_modules():
        cls, leaf = type(module), name.rsplit(".", 1)[-1]
        if cls in _SWAPPED.values():
            continue
        if cls.__name__ in NORM_CLASSES and (leaf in LAYER_NORMS or leaf == "norm"):
            module.__class__ = swapped_class(cls, norm_forward)
            module._posttrain_emits_autocast = leaf in LAYER_NORMS
            count += 1
        elif cls.__name__ in MLP_CLASSES and is_silu(module):
            module.__class__ = swapped_class(cls, mlp_forward)
            count += 1
    return count
