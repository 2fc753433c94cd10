"""precision: auto: the decision table, the cached probe, run_meta.json, and bf16 vs fp32 within a stated tolerance."""

import json

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.train import precision as P

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""


def probe(native=("avx512_bf16",), fp32=200.0, bf16=800.0) -> P.Probe:
    return P.Probe(cpu="test CPU", native_flags=tuple(native), threads=2, fp32_gflops=fp32, bf16_gflops=bf16)


def test_cpu_info_reads_the_model_and_flags():
    model, flags = P.cpu_info(CPUINFO)
    assert model == "AMD EPYC 9R14"
    assert {"avx512_bf16", "avx512_vnni"} <= flags and "amx_bf16" not in flags


@pytest.mark.parametrize(
    ("native", "fp32", "bf16", "want"),
    [
        (("avx512_bf16",), 200, 800, "bf16"),  # the AMD EPYC of 2026-12-06
        (("amx_bf16",), 300, 2400, "bf16"),  # a Xeon with AMX
        ((), 330, 62, "fp32"),  # the Xeon without native bf16
        (("avx512_bf16",), 200, 220, "fp32"),  # native but under the 1.2x margin
    ],
)
def test_auto_picks_bf16_only_where_native_and_measured_faster(native, fp32, bf16, want):
    choice = P.decide_cpu("auto", probe(native, fp32, bf16))
    assert choice.precision == want and not choice.warn
    assert f"{bf16:.0f} vs fp32 {fp32:.0f}" in choice.reason  # the reason carries the measurement


def test_bf16_without_native_support_warns_with_the_measured_slowdown():
    choice = P.decide_cpu("bf16", probe((), fp32=330, bf16=62))
    assert choice.precision == "bf16" and choice.warn
    assert "5.3x slowdown" in choice.reason  # 330 / 62


def test_fp16_on_cpu_and_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="fp16 on CPU"):
        P.decide_cpu("fp16", probe())
    with pytest.raises(ConfigError, match="unknown precision 'bf32'"):
        P.resolve("bf32", "cpu")
    assert P.resolve("fp32", "cpu") == P.Choice("fp32", "fp32", "asked for")


def test_the_probe_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    first = P.probe_cpu()
    files = list((tmp_path / "precision").glob("probe-*.json"))
    assert len(files) == 1 and first.fp32_gflops > 0 and first.bf16_gflops > 0
    raw = json.loads(files[0].read_text())
    files[0].write_text(json.dumps({**raw, "fp32_gflops": 1.5}))  # a second call reads, not measures
    assert P.probe_cpu().fp32_gflops == 1.5
    assert P.probe_cpu(refresh=True).fp32_gflops != 1.5
    files[0].write_text("{not json")  # a broken entry is measured again
    assert P.probe_cpu().fp32_gflops > 0


def test_a_run_records_the_choice_and_its_reason(tmp_path, tiny_model_dir):
    from posttrain.config import load_recipe
    from posttrain.train.sft import SFTRecipe, run_sft

    out = tmp_path / "sft"
    cfg = load_recipe(
        SFTRecipe, None,
        [f"model.path={tiny_model_dir}", f"output_dir={out}", "train.max_steps=1", "train.batch_size=2",
         "train.seq_len=128", "train.tensorboard=false", "train.num_samples=0", "data.n_per_level=4"],
    )  # fmt: skip
    run_sft(cfg)
    meta = json.loads((out / "run_meta.json").read_text())["precision"]
    want = P.resolve("auto", "cpu")
    assert (
        meta["requested"] == "auto" and meta["precision"] == want.precision and meta["reason"] == want.reason
    )
    assert "precision: auto" in (out / "config.yaml").read_text()  # the request, not the machine's answer


def test_bf16_autocast_step_matches_fp32_within_stated_tolerance(tiny_model_dir):
    """One SFT step's loss and gradients under bf16 autocast vs fp32: loss within 1% relative,
    gradient cosine > 0.99 (bf16 keeps 8 mantissa bits; master weights stay fp32)."""
    from posttrain.models.load import load_model
    from posttrain.train.loop import LoopConfig, train_step

    model = load_model(tiny_model_dir, dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 48), generator=g)  # inside the tiny tokenizer's vocabulary
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    grads, losses = {}, {}
    for prec in ("fp32", "bf16"):
        model.zero_grad()
        losses[prec] = train_step(model, [dict(batch)], LoopConfig(precision=prec), torch.device("cpu"))[
            "loss"
        ]
        grads[prec] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    cos = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cos > 0.99, float(cos)
    assert not torch.equal(grads["bf16"], grads["fp32"])  # bf16 really ran


def test_a_native_cpu_with_a_slow_cached_reading_is_measured_again(tmp_path, monkeypatch):
    """A probe cached while other jobs used the cores can undersell bf16; with native flags, a
    reading under the margin is measured again before auto settles on fp32."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "cpu_info", lambda cpuinfo=None: ("test CPU", {"avx512_bf16"}))
    readings = [{torch.float32: 200.0, torch.bfloat16: 180.0}, {torch.float32: 200.0, torch.bfloat16: 800.0}]
    calls = []

    def measure(dtype, n=P.PROBE_N, repeats=5):  # the hardware timing: busy at first, then quiet
        calls.append(dtype)
        return readings[(len(calls) - 1) // 2][dtype]

    monkeypatch.setattr(P, "matmul_gflops", measure)
    assert P.probe_cpu().speedup == pytest.approx(0.9)  # the busy reading, now cached
    choice = P.resolve("auto", "cpu")
    assert choice.precision == "bf16" and "4.00x" in choice.reason and len(calls) == 4
    assert P.probe_cpu().bf16_gflops == 800.0  # the new reading replaced the cached one


@pytest.mark.parametrize("tied", [True, False])
def test_precast_linears_give_the_same_log_probs_under_autocast(tied):
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.train.lm_loss import token_logprobs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    frozen = copy.deepcopy(model)
    P.precast_linears(frozen, "bf16")
    assert frozen.lm_head.weight.dtype == frozen.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    assert frozen.model.embed_tokens.weight.dtype == torch.float32  # a tied head got its own copy
    assert model.lm_head.weight.dtype == torch.float32  # the source is untouched
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = (token_logprobs(m, batch)[0] for m in (model, frozen))
    assert torch.equal(got, want)  # autocast casts the fp32 weights to exactly these bf16 values
    with torch.no_grad():
        fp32 = token_logprobs(model, batch)[0]
    assert (want - fp32).abs().max() > 1e-4  # autocast did change the numbers: the check above is not vacuous
    untouched = copy.deepcopy(model)
    P.precast_linears(untouched, "fp32")
    assert untouched.lm_head.weight.dtype == torch.float32
