"""The memory planner: hand-checked arithmetic (SmolLM2-135M's shape), measured peak RSS of real
short runs, and the refusal naming settings that fit."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.distributed.plan import (
    GIB,
    ModelShape,
    PlanConfig,
    PlanError,
    Workload,
    activation_bytes,
    check_fits,
    estimate,
    infer_command,
    mem_available,
    model_shape,
    plan_recipe,
)

# SmolLM2-135M: 30 layers, hidden 576, 9 heads of 64, 3 kv heads (kv 192), MLP 1536, vocab 49152, tied.
SMOL_LAYER = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576  # q,o + k,v + MLP + 2 norms
SMOL = ModelShape(
    params=30 * SMOL_LAYER + 49152 * 576 + 576, trainable=30 * SMOL_LAYER + 49152 * 576 + 576,
    layers=30, hidden=576, kv_dim=192, mlp=1536, vocab=49152, largest_layer=SMOL_LAYER,
)  # fmt: skip


def test_smollm2_arithmetic_by_hand():
    assert SMOL.params == 134_515_008  # the published 135M (tied embeddings counted once)
    work = Workload(tokens=4 * 256, weight_bytes=4, act_bytes=4, chunk=1024)
    parts = estimate(SMOL, work, "none", 1, checkpointing=False)
    assert parts["weights"] == 134_515_008 * 4
    assert parts["gradients"] == 134_515_008 * 4
    assert parts["optimizer (AdamW)"] == 134_515_008 * 8
    # per layer and token: 4 x 576 fp32 norm elements + (6 x 576 + 2 x 192 + 4 x 1536) x 4 bytes
    per_token_layer = 4 * 576 * 4 + (3456 + 384 + 6144) * 4
    assert per_token_layer == 49_152
    head = 2 * 1024 * 49152 * 4
    assert parts["activations"] == 30 * 1024 * per_token_layer + 2 * 1024 * 576 * 4 + head
    ckpt = activation_bytes(SMOL, work, checkpointing=True)
    assert ckpt == 30 * 1024 * 576 * 4 + 1024 * per_token_layer + 2 * 1024 * 576 * 4 + head
    assert parts["runtime"] == 128 * 2**20
    # 2.00 GiB of weights, gradients and moments + 1.80 GiB of activations (0.38 of them the LM head)
    assert 3.9 < sum(parts.values()) / GIB < 3.95


def test_sharding_divides_state_and_ddp_adds_buckets():
    work = Workload(tokens=1024, weight_bytes=2, act_bytes=2)
    none = estimate(SMOL, work, "none", 1, False)
    ddp = estimate(SMOL, work, "ddp", 8, False)
    fsdp = estimate(SMOL, work, "fsdp", 8, False)
    assert ddp["weights"] == none["weights"] and ddp["gradients"] == 2 * none["gradients"]
    assert fsdp["weights"] == SMOL.params * 2 // 8 + 2 * SMOL_LAYER * 2
    assert fsdp["optimizer (AdamW)"] == 2 * SMOL.params * 2 // 8
    assert fsdp["activations"] == none["activations"]  # activations are per rank's micro-batch


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_activation_formula_matches_the_bytes_autograd_saves(tiny_model_dir, peft):
    """Every tensor saved for backward in one forward of the loss (deduplicated by storage,
    parameters excluded) against `activation_bytes` for the same micro-batch."""
    import torch

    from posttrain.models.load import load_model
    from posttrain.models.peft import PeftConfig, apply_peft
    from posttrain.train.lm_loss import causal_lm_loss

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    if peft == "lora":
        model = apply_peft(model, PeftConfig(method="lora"))
    ids = torch.randint(3, 250, (8, 256), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(256).repeat(8, 1)
    pos[:, 128:] -= 128  # two packed samples per row
    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        causal_lm_loss(model, {"input_ids": ids, "labels": ids.clone(), "position_ids": pos})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(b for ptr, b in saved.items() if ptr not in params)
    shape = model_shape(str(tiny_model_dir))
    assert shape.fusable and type(model.get_decoder().norm).__name__.startswith("Fused")  # load_model swapped
    planned = activation_bytes(
        shape, Workload(tokens=8 * 256, weight_bytes=4, act_bytes=4, fused=True), False
    )
    assert abs(planned - measured) / measured < 0.1, (planned, measured)
    unfused = activation_bytes(shape, Workload(tokens=8 * 256, weight_bytes=4, act_bytes=4), False)
    assert unfused - planned == 2 * 8 * 256 * (2 * 64 * 4 + 128 * 4)  # L N (2h 4 + m a) fewer


def test_lora_counts_only_adapters(tiny_model_dir):
    from posttrain.models.peft import PeftConfig

    full = model_shape(str(tiny_model_dir))
    lora = model_shape(str(tiny_model_dir), PeftConfig(method="lora", r=4))
    # all-linear on 2 layers: q(64->64) k,v(64->32) o(64->64) gate,up(64->128) down(128->64), r (in + out) each
    per_layer = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert lora.trainable == 2 * per_layer
    assert lora.params == full.params + lora.trainable
    assert (full.layers, full.hidden, full.kv_dim, full.mlp) == (2, 64, 32, 128)


def test_infer_command_and_meminfo(tmp_path):
    assert infer_command({"model", "rollout"}) == "rl" and infer_command({"model", "data"}) == "sft"
    info = tmp_path / "meminfo"
    info.write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert mem_available(str(info)) == 2048 * 1024


def _sft_recipe(model: Path, out: Path, **train):
    from posttrain.config import load_recipe
    from posttrain.train.sft import SFTRecipe

    over = [f"model.path={model}", f"output_dir={out}", "data.eval=null", "data.tasks=[arith]",
            "data.n_per_level=30", "train.tensorboard=false", "train.num_samples=0", "train.precision=fp32"]  # fmt: skip
    over += [f"train.{k}={v}" for k, v in train.items()]
    return load_recipe(SFTRecipe, "recipes/sft_tiny.yaml", over), over


MEASURE = textwrap.dedent(
    """
    import json, sys
    from posttrain.config import load_recipe
    from posttrain.train.sft import SFTRecipe, run_sft
    import posttrain.models.load, posttrain.data.sft_data, transformers, peft  # noqa
    def status(key):  # VmHWM, not ru_maxrss: that one keeps the forking parent's RSS across exec
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    run_sft(load_recipe(SFTRecipe, "recipes/sft_tiny.yaml", sys.argv[1:]))
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
    """
)


def measured_peak(overrides: list[str]) -> int:
    """Peak RSS of a real `run_sft` in a fresh interpreter minus its RSS after the imports."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *overrides], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parents[2], env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["peak"] - got["base"]


@pytest.fixture(scope="module")
def mid_model_dir(tmp_path_factory, build_model_dir):
    """A 4-layer Qwen2 with hidden 256 (4.3M parameters): state and activations well above RSS noise."""
    sizes = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024)
    return build_model_dir(tmp_path_factory.mktemp("mid") / "model", 300, **sizes)


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_estimate_within_25_percent_of_measured_peak_rss(mid_model_dir, tmp_path, peft):
    recipe, over = _sft_recipe(mid_model_dir, tmp_path / peft, max_steps=2, batch_size=8, seq_len=256)
    recipe = dataclasses.replace(recipe, peft=dataclasses.replace(recipe.peft, method=peft))
    over.append(f"peft.method={peft}")
    planned = plan_recipe(recipe, PlanConfig(device="cpu"), "sft").total
    peak = measured_peak(over)
    print(f"{peft}: planned {planned / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB")
    assert abs(planned - peak) / peak < 0.25, (planned, peak)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_plans_what_the_trainer_will_run(tiny_model_dir, tmp_path, monkeypatch, native):
    import posttrain.train.precision as precision
    from posttrain.distributed.plan import workload

    chosen = "bf16" if native else "fp32"
    monkeypatch.setattr(precision, "resolve", lambda req, dev, key="": precision.Choice(req, chosen, "probe"))
    recipe, _ = _sft_recipe(tiny_model_dir, tmp_path, batch_size=8, seq_len=64, precision="auto")
    work = workload(recipe, "sft", "cpu", 0)
    assert (work.act_bytes, work.autocast) == ((2, True) if native else (4, False))
    assert workload(recipe, "sft", "cuda", 0).act_bytes == 2  # CUDA: bf16 autocast, no probe


def test_refusal_names_settings_that_fit(tiny_model_dir, tmp_path):
    recipe, _ = _sft_recipe(tiny_model_dir, tmp_path, batch_size=64, seq_len=256)
    plan = PlanConfig(device="cpu", memory_gib=0.21)
    result = plan_recipe(recipe, plan, "sft")
    assert not result.fits and result.strategy == "none"
    with pytest.raises(PlanError) as err:
        check_fits(recipe, plan, "sft", result)
    text = err.value.render()
    assert f"needs {result.total / GIB:.2f} GiB per rank, cpu has 0.21 GiB" in text and "Fix: any of:" in text
    assert "train.batch_size=32 train.grad_accum=2" in text  # the largest micro-batch that fits, named once
    assert "train.batch_size=16" not in text
    assert "peft.method=lora" not in text  # LoRA alone leaves the activations over the budget
    if not hasattr(recipe.train, "gradient_checkpointing"):  # never a setting the trainer lacks
        assert "checkpointing" not in text.split("Fix:")[1]
    ckpt = plan_recipe(recipe, PlanConfig(device="cpu", memory_gib=0.21, gradient_checkpointing=True), "sft")
    assert ckpt.parts["activations"] == result.activations_with_ckpt < result.parts["activations"]
    roomy = PlanConfig(device="cpu", memory_gib=64)
    check_fits(recipe, roomy, "sft", plan_recipe(recipe, roomy, "sft"))


def test_world_size_slices_the_global_batch(tiny_model_dir, tmp_path):
    recipe, _ = _sft_recipe(tiny_model_dir, tmp_path, batch_size=64, seq_len=256)
    one = plan_recipe(recipe, PlanConfig(device="cpu", memory_gib=64), "sft")
    two = plan_recipe(recipe, PlanConfig(device="cpu", memory_gib=64, world_size=2, strategy="ddp"), "sft")
    assert two.strategy == "ddp" and two.available == one.available // 2  # the host is shared
    assert two.parts["gradients"] == 2 * one.parts["gradients"]  # DDP's bucket copy
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    head = 2 * 1024 * vocab * 4  # one chunk of logits and its gradient, unchanged by the slice
    assert two.parts["activations"] - head == (one.parts["activations"] - head) // 2


def test_plan_command(monkeypatch, capsys, tiny_model_dir, tmp_path):
    from posttrain.cli import main

    monkeypatch.chdir(Path(__file__).parents[2])
    argv = [
        "posttrain",
        "plan",
        "recipes/grpo_tiny.yaml",
        f"model.path={tiny_model_dir}",
        "plan.memory_gib=0.05",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as code:
        main()
    out = capsys.readouterr()
    assert code.value.code != 0 and "Traceback" not in out.err
    assert "plan (rl, strategy none, world size 1): needs" in out.err and "rollout KV cache" in out.err
    monkeypatch.setattr(sys, "argv", [*argv[:-1], "plan.memory_gib=8", "plan.bogus=1"])
    with pytest.raises(SystemExit):
        main()
    assert "unknown key 'plan.bogus'" in capsys.readouterr().err
