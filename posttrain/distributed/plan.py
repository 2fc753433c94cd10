"""The memory planner: `posttrain plan RECIPE.yaml` estimates one rank's peak memory before a run.

Per rank, in bytes (P = parameters, T = trainable parameters, W = world size, w = bytes per
weight element: 4 fp32, 2 bf16/fp16; a = bytes per activation element: 4 in fp32, 2 under
bf16/fp16 autocast):

- weights ``P w``; ddp: the same on every rank; fsdp: ``P w / W`` plus the all-gathered
  (unsharded) parameters of the largest decoder layer, twice (the next layer is prefetched);
- gradients ``T w``; ddp adds its bucket copy (``T w``); fsdp: ``T w / W`` plus one unsharded layer;
- AdamW state: two moments of each trainable parameter in its dtype (``2 T w``; / W under fsdp);
  LoRA trains only the adapters, so T is the adapter size (the base weights carry no state);
- activations saved for the backward of one micro-batch of N = batch_size x seq_len tokens,
  per decoder layer and token (hidden h, key/value width k, MLP width m, HF Llama/Qwen2 layer
  with SDPA): two RMSNorms save 2 x (input h + normalised h) = 4h elements in fp32, the
  attention about 6h + 2k (q, k, v, the rotary-embedding and grouped-query copies, its output
  and the o_proj input), the SwiGLU MLP gate, up, silu(gate) and their product (4m):
  ``L N ((4h) 4 + (6h + 2k + 4m) a)``; with the fused CPU kernels (`posttrain.models.fused_ops`)
  each norm saves only its input (2h) and the MLP gate, up and the product (3m):
  ``L N ((2h) 4 + (6h + 2k + 3m) a)`` -- within 6% of the bytes autograd saves for the test
  models (`tests/distributed/test_plan.py` counts them with saved-tensor hooks); LoRA adds
  one output-sized tensor per adapted linear layer and token: PEFT's ``base(x) + B(A(x)) s``
  allocates output-sized temporaries that autograd does not keep, yet the CPU heap does not give
  back in between (measured: a LoRA forward grows RSS by 349 MiB for 205 MiB of saved
  tensors, a full one by 269 MiB for 223 MiB); with
  gradient checkpointing only each layer's input (``L N h a``) plus one layer recomputed;
- the LM head: SFT-style losses hold one chunk of V-wide fp32 logits and its gradient
  (``2 chunk V 4``); the RL update keeps the log-softmax of every scored token (``N V 4``,
  twice with the entropy) -- `posttrain.train.lm_loss.chunked_logprobs` does;
- RL rollouts with the hf engine: the KV cache of ``rows = min(prompts_per_step, max_batch_rows
  // n) x n`` rows of ``prompt_tokens + max_new_tokens`` positions (``2 L rows pos k w``), a
  frozen reference copy (``P w``) for a full-weight policy with a KL term;
- autocast keeps a low-precision copy of the weights it casts (``P 2``);
- the runtime: on CPU 128 MiB (the allocator's cache, data, tokenizer, export; measured as the
  peak RSS of 2-step SFT runs above the state and activations: 45-95 MiB on an AMD EPYC, 117-214
  MiB on an Intel Xeon with AMX, the higher figures inside the full test suite), on CUDA 1 GiB
  (context and caching allocator).

Deviations (stated, not hidden): the CPU allocator's caching and the interpreter itself are
not counted (the tests compare against peak RSS minus the RSS after imports); attention
kernels are assumed to be memory-efficient (no T x T score matrix, true for SDPA's CPU flash
and CUDA kernels); vLLM's reserve is its ``gpu_memory_utilization`` share, not estimated.

The estimate is compared with the device: CUDA total memory per rank, or on CPU the host's
MemAvailable shared by every rank of the node. A configuration that does not fit raises a
`PlanError` naming the settings that would (each re-estimated, not guessed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.errors import ConfigError, PosttrainError

GIB = 1024**3
MIB = 1024**2
RUNTIME_BYTES = {"cpu": 128 * MIB, "cuda": GIB}
Strategy = Literal["none", "ddp", "fsdp"]


class PlanError(PosttrainError):
    """A configuration whose estimated memory exceeds the device's."""


@dataclass
class PlanConfig:
    """The planner's own settings (``plan.*`` overrides on the command line)."""

    command: str | None = None
    """Which trainer the recipe is for (sft, rl, ...); null = rl when it has a rollout section, else sft."""
    strategy: Strategy | None = None
    """none | ddp | fsdp; null = the recipe's distributed.strategy (none without one)."""
    world_size: int | None = None
    """Ranks; null = the recipe's distributed.nproc (1 without one)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Whose memory to compare with: auto = cuda when torch sees a GPU, else cpu."""
    memory_gib: float | None = None
    """Device memory per rank in GiB (cuda) or of the whole host (cpu); null = measured."""
    gradient_checkpointing: bool = False
    """Plan for activation checkpointing (both figures are always printed; a recipe's own
    train.gradient_checkpointing, where the trainer has one, counts too)."""
    prompt_tokens: int = 128
    """Prompt length assumed for RL rollouts and updates."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model config (and, for LoRA, the adapter size)."""

    params: int
    """All parameters (tied embeddings counted once)."""
    trainable: int
    """Parameters with gradients and optimizer state."""
    layers: int
    hidden: int
    kv_dim: int
    """num_key_value_heads x head_dim."""
    mlp: int
    """intermediate_size."""
    vocab: int
    largest_layer: int
    """Parameters of the biggest decoder layer (the FSDP all-gather unit)."""
    adapter_out: int = 0
    """Sum of the output widths of every LoRA-adapted linear layer (0 without adapters)."""
    fusable: bool = False
    """Llama-family RMSNorms and SiLU MLPs (`posttrain.models.fused_ops` swaps them on CPU)."""


@dataclass(frozen=True)
class Workload:
    """The recipe's numbers that size the estimate."""

    tokens: int
    """Tokens of one micro-batch (batch_size x seq_len, or an RL mini-batch's rows x length)."""
    weight_bytes: int
    act_bytes: int
    autocast: bool = False
    chunk: int = 1024
    full_logits: bool = False
    """RL update: log-softmax of every scored token kept (with ``entropy``: twice)."""
    entropy: bool = False
    kv_rows: int = 0
    kv_positions: int = 0
    reference_copy: bool = False
    fused: bool = False
    """The fused CPU kernels are in use (`posttrain.models.cpu_kernels` built): a `fusable` model's
    norms save only their input and its MLP three tensors (module docstring)."""


@dataclass
class MemoryPlan:
    """One rank's estimate in bytes, by part, and the device it is compared with."""

    parts: dict[str, int]
    activations_without_ckpt: int
    activations_with_ckpt: int
    strategy: str
    world_size: int
    device: str
    available: int
    """Bytes the estimate must fit in (per rank: host MemAvailable / world size on cpu)."""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def table(self) -> str:
        rows = [f"{name:<24}{b / GIB:10.3f} GiB" for name, b in self.parts.items()]
        rows += [
            f"{'total per rank':<24}{self.total / GIB:10.3f} GiB",
            f"{'available per rank':<24}{self.available / GIB:10.3f} GiB ({self.device})",
            f"activations: {self.activations_without_ckpt / GIB:.3f} GiB without checkpointing, "
            f"{self.activations_with_ckpt / GIB:.3f} GiB with",
        ]
        return f"strategy {self.strategy}, world size {self.world_size}\n" + "\n".join(rows)


def layer_activation_bytes(hidden: int, kv_dim: int, mlp: int, act_bytes: int, fused: bool = False) -> int:
    """Bytes saved for backward per token by one decoder layer (module docstring)."""
    norms, mlps = (2, 3) if fused else (4, 4)
    return norms * hidden * 4 + (6 * hidden + 2 * kv_dim + mlps * mlp) * act_bytes


def activation_bytes(shape: ModelShape, work: Workload, checkpointing: bool) -> int:
    """Saved activations of one micro-batch plus the LM head's logits (module docstring)."""
    fused = work.fused and shape.fusable
    per_layer = (
        layer_activation_bytes(shape.hidden, shape.kv_dim, shape.mlp, work.act_bytes, fused) * work.tokens
    )
    if checkpointing:
        body = shape.layers * work.tokens * shape.hidden * work.act_bytes + per_layer
    else:
        body = shape.layers * per_layer
    body += 2 * work.tokens * shape.hidden * 4  # final norm, embeddings output
    body += work.tokens * shape.adapter_out * work.act_bytes  # LoRA's output-sized temporaries (docstring)
    if work.full_logits:
        head = work.tokens * shape.vocab * 4 * (2 if work.entropy else 1)
    else:
        head = 2 * min(work.chunk, work.tokens) * shape.vocab * 4
    return body + head


def estimate(
    shape: ModelShape,
    work: Workload,
    strategy: str,
    world_size: int,
    checkpointing: bool,
    device: str = "cpu",
) -> dict[str, int]:
    """Per-rank bytes by part (module docstring); pure arithmetic, hand-checkable."""
    w, p, t = work.weight_bytes, shape.params, shape.trainable
    if strategy == "fsdp":
        weights = p * w // world_size + 2 * shape.largest_layer * w
        grads = t * w // world_size + shape.largest_layer * w
        optim = 2 * t * w // world_size
    else:
        weights, grads, optim = p * w, t * w * (2 if strategy == "ddp" else 1), 2 * t * w
    parts = {"weights": weights, "gradients": grads, "optimizer (AdamW)": optim}
    parts["activations"] = activation_bytes(shape, work, checkpointing)
    if work.autocast:
        parts["autocast weight copies"] = p * 2
    if work.reference_copy:
        parts["reference model"] = p * w
    if work.kv_rows:
        parts["rollout KV cache"] = 2 * shape.layers * work.kv_rows * work.kv_positions * shape.kv_dim * w
    parts["runtime"] = RUNTIME_BYTES[device]
    return parts


# ---------------------------------------------------------------- from a recipe


def model_shape(path: str, peft: Any = None) -> ModelShape:
    """Count parameters on the meta device (no weights loaded); LoRA / IA3 adapters applied there too."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.train.loop import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    layers = model.get_decoder().layers
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    trainable, adapter_out = params, 0
    if peft is not None and peft.method != "full":
        from posttrain.models.peft import apply_peft

        wrapped = apply_peft(model, peft)
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        params = sum(p.numel() for p in wrapped.parameters())
        adapted = [m for m in wrapped.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        adapter_out = sum(getattr(m.base_layer, "out_features", 0) for m in adapted)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    from posttrain.models.fused_ops import MLP_CLASSES, NORM_CLASSES

    fusable = type(layers[0].input_layernorm).__name__ in NORM_CLASSES and (
        type(layers[0].mlp).__name__ in MLP_CLASSES and getattr(cfg, "hidden_act", "") in ("silu", "swish")
    )
    return ModelShape(
        params, trainable, len(layers), cfg.hidden_size, kv_heads * head_dim,
        cfg.intermediate_size, cfg.vocab_size, largest, adapter_out, fusable,
    )  # fmt: skip


def _dtype_bytes(dtype: str, device: str) -> int:
    if dtype == "auto":
        return 2 if device == "cuda" else 4
    return 4 if dtype == "float32" else 2


def workload(recipe: Any, command: str, device: str, prompt_tokens: int, world_size: int = 1) -> Workload:
    """The sizes of one rank's micro-batch / rollout of ``recipe`` (an SFT-like or RL recipe);
    ``train.batch_size`` is the global micro-batch, each rank takes its slice."""
    w = _dtype_bytes(recipe.model.dtype, device)
    train = recipe.train
    precision = getattr(train, "precision", "fp32")
    if precision == "auto":  # the trainer's choice: bf16 autocast on CUDA; on CPU where bf16 is native
        from posttrain.train.precision import resolve

        precision = "bf16" if device == "cuda" else resolve("auto", "cpu").precision
    a = 2 if precision in ("bf16", "fp16") or w == 2 else 4
    autocast = precision in ("bf16", "fp16") and w == 4
    chunk = getattr(train, "chunk_size", 1024)
    from posttrain.models import cpu_kernels

    fused = device == "cpu" and cpu_kernels.load() is not None
    if command != "rl":
        rows = -(-train.batch_size // world_size)
        return Workload(rows * train.seq_len, w, a, autocast, chunk, fused=fused)
    ro, algo = recipe.rollout, recipe.algorithm
    rows = ro.prompts_per_step * ro.n
    per_update = -(-rows // algo.mini_batches)
    positions = prompt_tokens + ro.max_new_tokens
    kv_rows = min(ro.prompts_per_step, max(1, ro.max_batch_rows // ro.n)) * ro.n if ro.backend == "hf" else 0
    kl = algo.kl.coef > 0 or algo.kl.target is not None
    return Workload(
        per_update * positions, w, a, autocast, chunk, full_logits=True,
        entropy=getattr(algo, "entropy_coef", 0) > 0 or getattr(algo, "entropy_control", None) is not None,
        kv_rows=kv_rows, kv_positions=positions, reference_copy=kl and recipe.peft.method == "full", fused=fused,
    )  # fmt: skip


def device_memory(device: str, world_size: int, memory_gib: float | None) -> tuple[str, int]:
    """(device, bytes per rank): CUDA total memory of GPU 0, or the host's MemAvailable / world size."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if memory_gib is not None:
        total = int(memory_gib * GIB)
    elif device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
    else:
        total = mem_available()
    return device, (total if device == "cuda" else total // world_size)


def mem_available(meminfo: str = "/proc/meminfo") -> int:
    """MemAvailable of the host in bytes (Linux)."""
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise PlanError("no MemAvailable line", where=meminfo, fix="pass plan.memory_gib=N")


def infer_command(keys: set[str]) -> str:
    """rl for a recipe with a rollout, rewards or algorithm section, else sft."""
    return "rl" if {"rollout", "rewards", "algorithm"} & keys else "sft"


def _raw_keys(recipe_path: str | None) -> set[str]:
    """Top-level keys of the recipe (empty when unreadable: `load_recipe` then reports why)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(recipe_path).read_text()) if recipe_path else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()
    return set(raw) if isinstance(raw, dict) else set()


DDP_ONLY = ("rm", "prm", "rl")
"""Commands whose several-process runs are DDP only (reward-head wrappers, the RL update)."""


def _alternatives(
    recipe: Any, command: str, plan: PlanConfig, strategy: str, world: int
) -> list[tuple[str, Any]]:
    """(override text, changed copies) that may shrink the estimate, each re-planned by the caller."""
    out: list[tuple[str, Any]] = []
    train = recipe.train
    size = train.batch_size if command != "rl" else 1
    while size > 1:  # the largest micro-batch that fits, the global batch kept by accumulation
        size //= 2
        accum = train.grad_accum * train.batch_size // size
        new = dataclasses.replace(recipe, train=dataclasses.replace(train, batch_size=size, grad_accum=accum))
        out.append((f"train.batch_size={size} train.grad_accum={accum}", (new, plan)))
    if command == "rl" and recipe.algorithm.mini_batches < recipe.rollout.prompts_per_step * recipe.rollout.n:
        mb = recipe.algorithm.mini_batches * 2
        new = dataclasses.replace(recipe, algorithm=dataclasses.replace(recipe.algorithm, mini_batches=mb))
        out.append((f"algorithm.mini_batches={mb}", (new, plan)))
    if recipe.peft.method == "full":
        new = dataclasses.replace(recipe, peft=dataclasses.replace(recipe.peft, method="lora"))
        out.append(("peft.method=lora", (new, plan)))
    if not plan.gradient_checkpointing and hasattr(train, "gradient_checkpointing"):
        ckpt = dataclasses.replace(train, gradient_checkpointing=True)  # only where the trainer has it
        out.append(("train.gradient_checkpointing=true", (dataclasses.replace(recipe, train=ckpt), plan)))
    if world > 1 and strategy != "fsdp" and command not in DDP_ONLY:
        out.append(("distributed.strategy=fsdp", (recipe, dataclasses.replace(plan, strategy="fsdp"))))
    if recipe.model.dtype in ("auto", "float32"):
        new = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype="bfloat16"))
        out.append(("model.dtype=bfloat16", (new, plan)))
    return out


def _dist(recipe: Any, plan: PlanConfig) -> tuple[str, int]:
    dist = getattr(recipe, "distributed", None)
    strategy = plan.strategy or getattr(dist, "strategy", None) or "none"
    world = plan.world_size or getattr(dist, "nproc", None) or 1
    if world < 1:
        raise ConfigError("world size must be >= 1", where="plan.world_size")
    if world == 1:
        strategy = "none"  # the trainers use a strategy only with more than one process
    elif strategy == "none":
        strategy = "ddp"
    return strategy, int(world)


def plan_recipe(recipe: Any, plan: PlanConfig, command: str, shape: ModelShape | None = None) -> MemoryPlan:
    """Estimate ``recipe`` under ``plan`` (no refusal; see `check_fits`)."""
    strategy, world = _dist(recipe, plan)
    device, available = device_memory(plan.device, world, plan.memory_gib)
    shape = shape or model_shape(recipe.model.path, recipe.peft)
    work = workload(recipe, command, device, plan.prompt_tokens, world)
    ckpt = plan.gradient_checkpointing or bool(getattr(recipe.train, "gradient_checkpointing", False))
    parts = estimate(shape, work, strategy, world, ckpt, device)
    return MemoryPlan(
        parts, activation_bytes(shape, work, False), activation_bytes(shape, work, True),
        strategy, world, device, available,
    )  # fmt: skip


def check_fits(recipe: Any, plan: PlanConfig, command: str, result: MemoryPlan) -> None:
    """PlanError when ``result`` does not fit, naming the alternatives whose own estimate fits."""
    if result.fits:
        return
    strategy, world = result.strategy, result.world_size
    fixes, batch_named = [], False
    for text, (alt_recipe, alt_plan) in _alternatives(recipe, command, plan, strategy, world):
        if batch_named and text.startswith("train.batch_size"):
            continue
        alt = plan_recipe(alt_recipe, alt_plan, command)
        if alt.fits:
            fixes.append(f"{text} ({alt.total / GIB:.2f} GiB)")
            batch_named = batch_named or text.startswith("train.batch_size")
    raise PlanError(
        f"needs {result.total / GIB:.2f} GiB per rank, {result.device} has {result.available / GIB:.2f} GiB "
        f"({', '.join(f'{k} {v / GIB:.2f}' for k, v in result.parts.items())})",
        where=f"plan ({command}, strategy {strategy}, world size {world})",
        fix=("any of: " + "; ".join(fixes))
        if fixes
        else "a smaller model, more ranks with fsdp, or a bigger device",
    )


def plan_main(recipe_path: str | None, overrides: list[str]) -> MemoryPlan:
    """CLI entry: `posttrain plan RECIPE.yaml [key=value ...] [plan.key=value ...]`."""
    from posttrain.cli import RECIPE_TYPES, recipe_type
    from posttrain.config import apply_override, from_dict, load_recipe
    from posttrain.monitor.logger import console

    plan_raw: dict = {}
    rest = []
    for item in overrides:
        if item.startswith("plan."):
            apply_override(plan_raw, item[len("plan.") :])
        else:
            rest.append(item)
    plan = from_dict(PlanConfig, plan_raw, prefix="plan.", source="overrides")
    command = plan.command or infer_command(_raw_keys(recipe_path))
    if command not in RECIPE_TYPES:
        raise ConfigError(
            f"unknown command {command!r}", where="plan.command", fix=f"one of {', '.join(RECIPE_TYPES)}"
        )
    recipe = load_recipe(recipe_type(command), recipe_path, rest)
    result = plan_recipe(recipe, plan, command)
    console.print(result.table())
    check_fits(recipe, plan, command, result)
    console.print(f"[green]fits[/green]: {result.total / GIB:.2f} of {result.available / GIB:.2f} GiB")
    return result
