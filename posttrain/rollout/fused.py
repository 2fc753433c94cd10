"""A lean forward of Llama-family decoders for the rollout engine on CPU.

Why: on 2 CPU cores a SmolLM2-135M decode step of 32 rows spent ~60% of its time in ``aten::mm``
at 6-10 GB/s, far under the memory bandwidth, and a fifth more in HF's per-module Python and
``scaled_dot_product_attention`` over one query token. `FusedLM` runs the same arithmetic with

- one matmul for q, k, v and one for gate, up (weights concatenated once, as vLLM's
  ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` do): 4 matmuls a layer instead of 7;
- oneDNN weights reordered once into the layout its kernels read (``mkldnn._reorder_linear_weight``,
  what inductor's weight freezing uses): 1.3-3x faster than ``F.linear`` at 1-32 rows, the LM head
  most of all (SmolLM2's 576 x 49152 head: 32 rows 7.5 -> 5.3 ms bf16, 33 -> 10 ms fp32);
- decode attention (one query token) as two batched matmuls with the query heads grouped under
  their key/value head (no ``repeat_kv`` copy); longer blocks (prefill) use SDPA with ``enable_gqa``.
  RoPE, keys, values and attention are fp32 whatever the weights' dtype: bf16 attention scores
  (magnitudes ~30, 8 mantissa bits) moved SmolLM2's greedy tokens, and CPU SDPA over one bf16
  query was 7x slower than these matmuls in fp32;
- keys and values written into the engine's reserved cache (`kv_cache.ReservedLayer`), so
  prefix reuse and row dropping work on the same buffers;
- where the C++ kernels of `posttrain.models.cpu_kernels` built: the residual add with the next
  RMSNorm, SiLU * up, and for each decoded token RoPE with the cache write and (small caches,
  `ATTEND_KERNEL_MAX`) the attention, each one pass instead of several ops (SmolLM2, 32 rows, a
  60-token context: 31 -> 25 ms a step; tiny default, 8 rows: 0.81 -> 0.51 ms).

What it supports: ``model_type`` llama, qwen2 or mistral with SiLU MLPs, full attention in every
layer (a sliding-window cache is not a reserved cache: the engine then keeps HF's forward), plain
``nn.Linear`` projections or PEFT LoRA on them (the adapter's delta merged into the copy; DoRA and
LoRA biases are not). `unsupported` says why a model is not.

Weights are a snapshot: `FusedLM.stale` compares the source parameters' identities and version
counters (bumped by every in-place update: optimizer steps, ``load_state_dict``), so the engine
rebuilds the snapshot when the trainer has changed the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from posttrain.models import cpu_kernels

MODEL_TYPES = ("llama", "qwen2", "mistral")
ATTEND_KERNEL_MAX = 1 << 18
"""Where the kernel runs its portable loops (no AVX-512, or a head size other than 32 / 64 / 128),
decode attention runs in `cpu_kernels.decode_attention` up to this many key elements a layer (rows x
KV heads x length x head size), in PyTorch's batched matmuls above: those loops' per-call cost is
~one op's, the matmuls' ~six, but the matmuls read long caches faster. Measured on an Intel Xeon with
AMX (2 threads): tiny default, 4 rows x 40 tokens, a whole step 0.46 ms kernel vs 0.57; SmolLM2, 32
rows x 100 tokens, even; x 300 tokens, 52 vs 46 ms. The AVX-512 path runs at every length: SmolLM2,
32 rows (8 a prompt, sharing off), a step at ~70-token contexts 25.8 -> 24.9 ms and at ~260 42.3 ->
36.1 ms against this threshold."""
PACK_MIN_ELEMENTS = 1 << 18
"""Smaller weights stay plain: oneDNN's per-call cost (~15 us) outweighs its gain on the tiny
default's 128 x 512 matmuls at few rows."""


class Unsupported(Exception):
    """The model has a part `FusedLM` does not reproduce (the message says which)."""


def lora_adapters(module: Any) -> list[str] | None:
    """The active adapters whose deltas a PEFT LoRA ``Linear`` adds (none when merged or disabled);
    None when ``module`` is not one. DoRA and LoRA biases are `Unsupported`."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # peft is a core dependency; be robust anyway
        return None
    if not isinstance(module, LoraLinear):
        return None
    if module.merged or module.disable_adapters:
        return []
    names = [name for name in module.active_adapters if name in module.lora_A]
    for name in names:
        if module.use_dora.get(name) or module.lora_bias.get(name):
            raise Unsupported(f"LoRA adapter {name!r} uses DoRA or a LoRA bias")
    return names


def check_linear(module: Any) -> list[str] | None:
    """Raise `Unsupported` unless ``module`` is a plain ``nn.Linear`` (None) or LoRA on one (its
    adapters); computes nothing."""
    if type(module) is torch.nn.Linear:
        return None
    adapters = lora_adapters(module)
    if adapters is None:
        raise Unsupported(f"{type(module).__name__} is not a plain or LoRA nn.Linear")
    return adapters


def dense(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) that ``module`` applies: a plain ``nn.Linear``, or LoRA on one with
    its active adapters' deltas added."""
    adapters = check_linear(module)
    if adapters is None:
        return module.weight, module.bias
    base = module.get_base_layer()
    weight = base.weight
    for name in adapters:
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN's reordered linear weights run here in ``dtype``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class Linear:
    """``x @ weight.T + bias`` with the weight (out, in) in oneDNN's own layout when ``pack`` and
    large enough, else stored transposed, (in, out), for a plain ``mm``: 2-3x faster than
    ``F.linear``'s x @ w.T at few rows (one thread, fp32, 8 rows x 128 -> 1024: 23.7 -> 10.0 us)."""

    __slots__ = ("weight_t", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
        self.bias, self.packed, self.weight_t = bias, None, None
        if pack and weight.numel() >= PACK_MIN_ELEMENTS:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32)  # 32: a batch hint
        else:
            self.weight_t = weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        flat = x.reshape(-1, x.shape[-1])
        y = (
            torch.mm(flat, self.weight_t)
            if self.bias is None
            else torch.addmm(self.bias, flat, self.weight_t)
        )
        return y.view(*x.shape[:-1], y.shape[-1])


@dataclass
class Block:
    """One decoder layer's weights, fused."""

    norm1: torch.Tensor
    qkv: Linear
    out: Linear
    norm2: torch.Tensor
    gate_up: Linear
    down: Linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm as one fused op (``F.rms_norm`` accumulates in fp32 for bf16 inputs; HF rounds
    to bf16 once more before the weight: the two differ by at most one bf16 rounding)."""
    return F.rms_norm(x, weight.shape, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's rotate_half convention, x * cos + [-x2, x1] * sin, written as x * cos +
    roll(x) * [-sin1, sin2] (`signed_sin`); cos/sin (R, 1, S, D) broadcast over heads."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def block_mask(keys: torch.Tensor | None, rows: int, start: int, length: int, device: Any) -> torch.Tensor:
    """(R, 1, length, start + length) boolean mask of a block of ``length`` new tokens after
    ``start`` cached ones: causal, and the padding mask ``keys`` (R, >= start + length) when given.
    A query always sees itself, so left-pad queries (attending to nothing else) stay finite."""
    end = start + length
    col = torch.arange(end, device=device)
    row = torch.arange(start, end, device=device)[:, None]
    mask = (col <= row)[None, None].expand(rows, 1, length, end)
    if keys is not None:
        mask = mask & keys[:, None, None, :end].bool()
    return mask | (col == row)[None, None]


class FusedLM:
    """The forward of a Llama-family causal LM from fused snapshot weights (module docstring).

    ``dtype``: the weights' and activations' dtype (bf16 on CPUs with native bf16, else fp32).
    `forward` is what the engine's prefill and decode steps call."""

    def __init__(self, model: Any, dtype: torch.dtype, kernels: bool | None = None):
        reason = unsupported(model)
        if reason:
            raise Unsupported(reason)
        self.source = model
        self.dtype = dtype
        self.kernels = None if kernels is False else cpu_kernels.load()
        if kernels and self.kernels is None:
            raise Unsupported(f"the fused CPU kernels did not build: {cpu_kernels.reason}")
        self.fingerprint = fingerprint(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.rotary = base.model.rotary_emb
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        self.rope_table = (
            None
            if "dynamic" in rope_type or rope_type == "longrope"
            else (torch.empty(0, 0), torch.empty(0, 0))
        )  # (cos, signed sin) by position, grown on demand; None: frequencies that follow the length
        pack = can_pack(dtype)

        def linear(*modules: Any) -> Linear:
            parts = [dense(m) for m in modules]
            weight = torch.cat([w.to(dtype) for w, _ in parts])  # cast first: no fp32 concatenation
            biases = [b for _, b in parts]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [
                        b if b is not None else w.new_zeros(w.shape[0])
                        for (w, _), b in zip(parts, biases, strict=True)
                    ]
                ).to(dtype)
            return Linear(weight, bias, pack)

        with torch.no_grad():
            self.embed = base.model.embed_tokens.weight.detach().to(dtype)
            self.blocks = []
            for layer in base.model.layers:
                att, mlp = layer.self_attn, layer.mlp
                self.scale = att.scaling
                self.blocks.append(
                    Block(
                        norm1=layer.input_layernorm.weight.detach().to(dtype),
                        qkv=linear(att.q_proj, att.k_proj, att.v_proj),
                        out=linear(att.o_proj),
                        norm2=layer.post_attention_layernorm.weight.detach().to(dtype),
                        gate_up=linear(mlp.gate_proj, mlp.up_proj),
                        down=linear(mlp.down_proj),
                    )
                )
            self.norm = base.model.norm.weight.detach().to(dtype)
            self.head = linear(base.lm_head)

    def stale(self) -> bool:
        """Whether the source model's weights changed since the snapshot."""
        return fingerprint(self.source) != self.fingerprint

    @torch.inference_mode()
    @torch.autocast("cpu", enabled=False)  # the snapshot has its own dtype; an outer autocast would mix
    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor | None, cache: Any
    ) -> torch.Tensor:
        """Run ``ids`` (R, S) at ``positions`` (R, S) after what ``cache`` holds (reserved layers
        or a `posttrain.rollout.shared_prefix.GroupCache`, written in place); ``keys`` (R, >=
        cached + S): the padding mask over cached and new positions (nonzero = attend), None when
        no row is padded. Returns the last position's logits (R, V) in fp32."""
        rows, width = ids.shape
        start = cache.get_seq_length()
        x = F.embedding(ids, self.embed)
        cos, sin = self.rope(positions)
        cos, sin = cos[:, None], sin[:, None]  # (R, 1, S, D)
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        kern = self.kernels
        shared = getattr(cache, "attend", None)
        # one new token a row after a prefill, over reserved layers: RoPE, cache write, attention fused
        fast = kern is not None and width == 1 and shared is None and start > 0
        attend_max = float("inf") if fast and kern.decode_attention_vectorized(d) else ATTEND_KERNEL_MAX
        if fast:
            cos, sin = cos.reshape(rows, d), sin.reshape(rows, d)
            mask = None if keys is None else keys.bool()
        elif width == 1:
            mask = None if keys is None else keys[:, None, None, : start + 1].bool()  # (R, 1, 1, L)
        else:
            mask = block_mask(keys, rows, start, width, ids.device)
        delta = None  # the last block's MLP output, added to x by the next norm
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x, h = self.add_norm(x, delta, block.norm1)
            qkv = block.qkv(h)
            if fast:
                column, k_buf, v_buf = layer.next_column()
                q = kern.rope_kv_(qkv.view(rows, -1), cos, sin, k_buf, v_buf, column, nq, nkv, self.scale)
                if rows * nkv * (column + 1) * d <= attend_max:
                    a = kern.decode_attention(q, k_buf, v_buf, column + 1, mask, self.dtype, False)
                else:
                    seen = None if mask is None else mask[:, None, None, : column + 1]
                    a = self.attend(q.view(rows, nq, 1, d), layer.keys, layer.values, seen, 1.0).to(
                        self.dtype
                    )
                a = a.view(rows, 1, -1)
            else:
                qkv = qkv.view(rows, width, nq + 2 * nkv, d).transpose(1, 2).float()
                q, k = rotate(qkv[:, : nq + nkv], cos, sin).split((nq, nkv), dim=1)
                if shared is not None:  # a `GroupCache`: attention over shared prompts + own suffixes
                    a = shared(layer, q, k, qkv[:, nq + nkv :], self.scale)
                else:
                    k_all, v_all = layer.update(k, qkv[:, nq + nkv :])  # fp32 keys / values
                    a = self.attend(q, k_all, v_all, mask, self.scale)
                a = a.to(self.dtype)
            x, h = self.add_norm(x, block.out(a), block.norm2)
            gate_up = block.gate_up(h)
            if kern is not None:
                delta = block.down(kern.silu_mul(gate_up))
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                delta = block.down(F.silu(gate) * up)
        if width > 1:  # only the last position reaches the head
            x, delta = x[:, -1:].contiguous(), delta[:, -1:].contiguous()
        x, h = self.add_norm(x, delta, self.norm)
        return self.head(h[:, -1]).float()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (R, S, D) fp32, at ``positions`` (R, S): the rotary module's own
        values (each position's depend on it alone), gathered from a table built once (grown to
        twice the length needed) instead of ~10 ops a step; ``signed sin`` is [-sin_1, sin_2] (see
        `rotate`). RoPE types whose frequencies follow the sequence length (dynamic, longrope)
        are computed at every call."""
        table = self.rope_table
        if table is None:
            return self.rope_at(positions)
        need = int(positions.max()) + 1
        if table[0].shape[0] < need:
            size = max(need, 2 * table[0].shape[0], 256)
            cos, sin = self.rope_at(torch.arange(size, device=positions.device)[None])
            self.rope_table = table = (cos[0], sin[0])
        return table[0][positions], table[1][positions]

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary module's (cos, signed sin) at ``positions`` (R, S), fp32."""
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)  # dtype and device only
        cos, sin = self.rotary(probe, positions)
        half = sin.shape[-1] // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, RMSNorm(x + delta) * weight); with the kernels x is updated in place."""
        if self.kernels is not None:
            return x, self.kernels.add_rms_norm_(x, delta, weight, self.eps)
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight, self.eps)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """Attention of q (R, H, S, D) over k, v (R, KV, L, D), all fp32, scores scaled by ``scale``;
        returns (R, S, H * D)."""
        rows, nq, width, d = q.shape
        nkv = k.shape[1]
        if width > 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=nkv != nq)
            return out.transpose(1, 2).reshape(rows, width, nq * d)
        grouped = q.reshape(rows, nkv, nq // nkv, d)  # query head h reads key/value head h // (H / KV)
        if scale != 1.0:
            grouped = grouped * scale
        scores = torch.matmul(grouped, k.transpose(-1, -2))  # (R, KV, G, L)
        if mask is not None:
            scores = scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v).reshape(rows, 1, nq * d)


def fingerprint(model: Any) -> tuple[tuple[int, int], ...]:
    """Identity and version counter of every parameter: changes with any in-place update."""
    return tuple((id(p), p._version) for p in model.parameters())


def unsupported(model: Any) -> str | None:
    """Why `FusedLM` cannot run ``model`` (None when it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"model_type {kind!r} (fused forward: {', '.join(MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if getattr(cfg, "pretraining_tp", 1) > 1:
        return "pretraining_tp > 1"
    inner = getattr(base, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(base, "lm_head"):
        return "not the standard <Model>ForCausalLM layout"
    if type(inner.embed_tokens) is not torch.nn.Embedding:
        return f"input embeddings are {type(inner.embed_tokens).__name__}"
    try:
        for layer in inner.layers:
            for m in (*_projections(layer), base.lm_head):
                check_linear(m)
    except (Unsupported, AttributeError) as err:
        return str(err)
    return None


def _projections(layer: Any) -> tuple[Any, ...]:
    att, mlp = layer.self_attn, layer.mlp
    return att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj
