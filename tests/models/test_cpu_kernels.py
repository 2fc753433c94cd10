"""The fused C++ decode kernels (`posttrain.models.cpu_kernels`) against the PyTorch ops they
replace: RMSNorm with the residual add, SiLU * up, RoPE with the cache write, decode attention
(GQA, padding mask, fp32 and bf16 storage), the sampler (`hf_engine.draw` over softmax); their input
checks; the switch that turns them off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.models import cpu_kernels
from posttrain.rollout.fused import FusedLM, Unsupported, rotate


@pytest.fixture(scope="module")
def kern():
    module = cpu_kernels.load()
    assert module is not None, f"the kernels must build here: {cpu_kernels.reason}"
    return module


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each of x's magnitudes."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.float()).exponent - 8)


def test_add_rms_norm_adds_in_place_and_normalises(kern):
    g = torch.Generator().manual_seed(0)
    x, delta, w = (
        torch.randn(3, 2, 48, generator=g),
        torch.randn(3, 2, 48, generator=g),
        torch.randn(48, generator=g),
    )
    ref_x = x + delta
    ref = ref_x * torch.rsqrt(ref_x.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # by hand
    got = kern.add_rms_norm_(x, delta, w, 1e-5)
    assert torch.equal(x, ref_x)  # updated in place
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    alone = kern.add_rms_norm_(x.clone(), None, w, 1e-5)
    torch.testing.assert_close(alone, ref, atol=1e-6, rtol=1e-5)


def test_bf16_storage_rounds_once_to_nearest_even(kern):
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(4, 64, generator=g).bfloat16(), torch.randn(4, 64, generator=g).bfloat16()
    w = torch.randn(64, generator=g).bfloat16()
    ref_x = x + delta  # PyTorch: fp32 sum, one rounding
    exact = ref_x.float() * torch.rsqrt(ref_x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    got = kern.add_rms_norm_(x, delta, w, 1e-6)
    assert torch.equal(x, ref_x)
    assert ((got.float() - exact).abs() <= bf16_ulp(exact) / 2 + 1e-6).all()  # one rounding of ~fp32
    gate_up = torch.randn(4, 2 * 40, generator=g).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    exact = F.silu(gate) * up
    assert ((kern.silu_mul(gate_up).float() - exact).abs() <= bf16_ulp(exact) / 2 + 1e-6).all()


def test_silu_mul_is_accurate_over_the_whole_range(kern):
    gate = torch.linspace(-120, 120, 4001)
    up = torch.linspace(-3, 3, 4001)
    got = kern.silu_mul(torch.cat([gate, up])[None])[0]
    ref = (F.silu(gate.double()) * up.double()).float()
    torch.testing.assert_close(got, ref, atol=1e-30, rtol=2e-6)  # the polynomial exp: ~1 ulp


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_writes_one_column_and_returns_scaled_q(kern, kv_dtype):
    g = torch.Generator().manual_seed(2)
    rows, nq, nkv, d, cap, column = 3, 6, 2, 16, 9, 5
    qkv = torch.randn(rows, (nq + 2 * nkv) * d, generator=g)
    cos, sin = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    kbuf, vbuf = (
        torch.randn(rows, nkv, cap, d, generator=g).to(kv_dtype),
        torch.zeros(rows, nkv, cap, d, dtype=kv_dtype),
    )
    before = kbuf.clone()
    q = kern.rope_kv_(qkv, cos, sin, kbuf, vbuf, column, nq, nkv, 0.25)
    heads = qkv.view(rows, 1, nq + 2 * nkv, d).transpose(1, 2)
    rotated = rotate(heads[:, : nq + nkv], cos[:, None, None], sin[:, None, None])[:, :, 0]
    torch.testing.assert_close(q, rotated[:, :nq] * 0.25, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        kbuf[:, :, column].float(), rotated[:, nq:].to(kv_dtype).float(), atol=1e-6, rtol=0
    )
    assert torch.equal(vbuf[:, :, column], heads[:, nq + nkv :, 0].to(kv_dtype))
    others = [c for c in range(cap) if c != column]
    assert torch.equal(kbuf[:, :, others], before[:, :, others]) and not vbuf[:, :, others].any()


@pytest.mark.parametrize("portable", [True, False])
@pytest.mark.parametrize(
    "d,length", [(16, 9), (32, 9), (32, 33), (64, 21), (64, 37), (128, 8), (128, 20), (64, 1)]
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_masked_softmax(kern, kv_dtype, d, length, portable):
    """Both the portable loops and (head sizes 32 / 64 / 128 where the CPU has AVX-512) the
    vectorised path; lengths below, at and past a block of 8 keys."""
    g = torch.Generator().manual_seed(3)
    rows, nq, nkv, cap = 4, 6, 2, 40
    q = torch.randn(rows, nq, d, generator=g)
    kbuf = torch.randn(rows + 1, nkv, cap, d, generator=g).to(kv_dtype)  # more rows reserved than used
    vbuf = torch.randn(rows + 1, nkv, cap, d, generator=g).to(kv_dtype)
    mask = torch.rand(rows, cap, generator=g) > 0.4
    mask[:, length - 1] = True  # a query sees itself
    k, v = kbuf[:rows, :, :length].float(), vbuf[:rows, :, :length].float()
    scores = q.view(rows, nkv, nq // nkv, d) @ k.transpose(-1, -2)  # query head h reads kv head h // 3
    scores = scores.masked_fill(~mask[:rows, None, None, :length], float("-inf"))
    ref = (torch.softmax(scores, -1) @ v).reshape(rows, nq * d)
    got = kern.decode_attention(q, kbuf, vbuf, length, mask, torch.float32, portable)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    unmasked = (torch.softmax(q.view(rows, nkv, nq // nkv, d) @ k.transpose(-1, -2), -1) @ v).reshape(
        rows, -1
    )
    torch.testing.assert_close(kern.decode_attention(q, kbuf, vbuf, length, None, torch.float32, portable),
                               unmasked, atol=1e-5, rtol=1e-5)  # fmt: skip
    assert length == 1 or not torch.allclose(ref, unmasked, atol=1e-3)  # the mask mattered
    half = kern.decode_attention(q, kbuf, vbuf, length, mask, torch.bfloat16, portable)
    assert half.dtype == torch.bfloat16 and torch.equal(half, got.bfloat16())


@pytest.mark.parametrize("vocab", [298, 1000, 49152])
def test_sample_softmax_draws_what_draw_draws_from_the_same_uniforms(kern, vocab):
    """The same uniform gives the same token as `draw` over torch.softmax, but for the rare draw
    that lands within fp32 rounding of a CDF boundary (summation orders differ: at most 2 of 256
    rows), and the log-prob is log_softmax at that token; bf16 logits are read as they are."""
    from posttrain.rollout.hf_engine import DRAW_BLOCK, draw

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(256, vocab, generator=g) * 3
    u = torch.rand(256, generator=torch.Generator().manual_seed(1))
    ref = draw(torch.softmax(logits, -1), torch.Generator().manual_seed(1))
    tok, logp = kern.sample_softmax(logits, u, DRAW_BLOCK)
    assert tok.dtype == torch.long and (tok != ref).sum() <= 2
    expected = torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)
    half = logits.bfloat16()
    tok16, _ = kern.sample_softmax(half, u, DRAW_BLOCK)
    assert (tok16 != draw(torch.softmax(half.float(), -1), torch.Generator().manual_seed(1))).sum() <= 2


def test_sample_softmax_frequencies_match_and_masked_tokens_never_come(kern):
    from posttrain.rollout.hf_engine import DRAW_BLOCK

    g = torch.Generator().manual_seed(0)
    vocab, n = 600, 60_000
    logits = torch.randn(vocab, generator=g) * 2
    logits[::5] = float("-inf")  # masked, some at block edges
    logits[-1] = float("-inf")  # the last token: where a rounding at u ~ 1 would end
    u = torch.rand(n, generator=g)
    u[:100] = 1 - 2**-24  # the largest float32 below 1
    tok, logp = kern.sample_softmax(logits.expand(n, vocab).contiguous(), u, DRAW_BLOCK)
    freq = tok.bincount(minlength=vocab).float() / n
    assert freq[::5].sum() == 0 and freq[-1] == 0
    p = torch.softmax(logits, -1)
    assert (freq - p).abs().max() < 5 * (p.max() / n) ** 0.5  # within 5 standard errors
    assert torch.isfinite(logp).all()
    bad = torch.randn(3, 40)
    bad[1, 7] = float("nan")
    tok, logp = kern.sample_softmax(bad, torch.rand(3), DRAW_BLOCK)
    assert logp[1].isnan() and torch.isfinite(logp[[0, 2]]).all()  # a NaN row is flagged, not hidden


def test_bad_inputs_raise_with_the_kernel_named(kern):
    with pytest.raises(RuntimeError, match="add_rms_norm_"):
        kern.add_rms_norm_(torch.randn(2, 8), None, torch.randn(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="silu_mul"):
        kern.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="rope_kv_: column"):
        kern.rope_kv_(torch.randn(1, 4 * 8), torch.randn(1, 8), torch.randn(1, 8), torch.zeros(1, 1, 3, 8),
                      torch.zeros(1, 1, 3, 8), 3, 2, 1, 1.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="decode_attention: length"):
        kern.decode_attention(torch.randn(1, 2, 8), torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8), 4, None,
                              torch.float32, False)  # fmt: skip
    with pytest.raises(RuntimeError, match="sample_softmax: u"):
        kern.sample_softmax(torch.randn(2, 8), torch.rand(3), 256)


def test_switched_off_the_snapshot_uses_pytorch_ops(monkeypatch, tiny_model_dir):
    from posttrain.models.load import load_model

    model = load_model(tiny_model_dir, dtype="float32", device="cpu")
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "reason", None)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert FusedLM(model, torch.float32).kernels is None
    assert cpu_kernels.reason == f"{cpu_kernels.ENV_SWITCH}=0"
    with pytest.raises(Unsupported, match="did not build"):
        FusedLM(model, torch.float32, kernels=True)


def test_build_name_follows_source_and_cpu(monkeypatch):
    first = cpu_kernels.build_name("int x;")
    assert cpu_kernels.build_name("int x;") == first and cpu_kernels.build_name("int y;") != first
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: "sse2")
    assert cpu_kernels.build_name("int x;") != first


def test_only_a_build_is_logged_not_a_load(kern, monkeypatch, caplog, tmp_path):
    """The built module is found in torch's extension cache (a process that loads it says nothing
    at INFO); a name never built is not."""
    assert cpu_kernels.built(cpu_kernels.build_name(cpu_kernels.SOURCE.read_text()))
    monkeypatch.setattr(cpu_kernels, "_module", None)  # a fresh process: load again
    with caplog.at_level("INFO", logger=cpu_kernels.__name__):
        assert cpu_kernels.load() is not None
    assert "building" not in caplog.text
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not cpu_kernels.built(cpu_kernels.build_name("int never_built;"))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension\ng++: command not found")

    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "reason", None)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(ext, "load_inline", no_compiler)
    with caplog.at_level("WARNING", logger=cpu_kernels.__name__):
        assert cpu_kernels.load() is None and cpu_kernels.load() is None
    assert cpu_kernels.reason == "RuntimeError: g++: command not found"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "g++: command not found" in warnings[0].getMessage()
