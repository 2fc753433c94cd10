"""The CPU attention (`posttrain.models.attention`): matmul attention on short bf16 training passes
gives SDPA's outputs and gradients (to bf16 rounding), SDPA everywhere else, and models loaded
on CPU use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.models.attention import ATTENTION, MATMUL_MAX_KEYS, attention, register, use_matmul
from posttrain.models.load import load_model


class Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def inputs(b=3, h=4, kv=2, length=20, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(b, heads, length, d, generator=gen, requires_grad=True)  # noqa: E731
    return make(h), make(kv), make(kv)


def reference(q, k, v, mask):
    """SDPA in fp32, keys/values repeated per query head."""
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2)


@pytest.mark.parametrize("masked", [False, True])
def test_matmul_path_matches_sdpa_under_bf16_autocast(masked):
    q, k, v = inputs()
    mask = None
    if masked:  # causal and right padding (row 1 ends at 12), like an RL batch
        keys = torch.ones(3, 20, dtype=torch.bool)
        keys[1, 12:] = False
        mask = torch.ones(20, 20, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert use_matmul(q, k)
        out, _ = attention(Module(), q, k, v, mask)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = reference(q, k, v, mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 0.05  # bf16 rounding of the matmuls
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max() < 0.05 * r.abs().max()


def test_fully_masked_query_rows_stay_finite():
    q, k, v = inputs(length=6)
    mask = torch.ones(3, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, :, :, :3] = False  # row 0's first three queries see nothing (left padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention(Module(), q, k, v, mask)
    assert torch.isfinite(out).all()
    ref = reference(q, k, v, mask)
    assert (out[0, 3:].float() - ref[0, 3:]).abs().max() < 0.05  # the real queries are unaffected


def test_sdpa_everywhere_else():
    q, k, v = inputs()
    assert not use_matmul(q, k)  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert use_matmul(q, k)  # scoring passes compute what training passes do
        long_q, long_k, _ = inputs(b=1, length=MATMUL_MAX_KEYS + 1)
        assert not use_matmul(long_q, long_k)  # long rows: SDPA's flash kernel is faster there
    out, _ = attention(Module(), q, k, v, None)  # fp32: SDPA itself
    assert torch.allclose(out, reference(q, k, v, None), atol=1e-6)


def test_models_loaded_on_cpu_use_it_and_keep_their_outputs(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="float32", device="cpu")
    assert model.config._attn_implementation == register() == ATTENTION
    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 20:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(input_ids=ids, attention_mask=mask).logits.float()
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (ours - theirs)[real].abs().max() < 0.1  # bf16 logits; same math, other rounding
    assert (ours - theirs)[real].abs().max() > 0  # the matmul path really ran


def test_the_mask_bias_is_built_once_per_mask_and_follows_changes():
    """Layers of one forward share the mask, so its additive bias is built once; another mask, or
    the same one changed in place, gets its own."""
    from posttrain.models.attention import mask_bias

    keep = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    first = mask_bias(keep, 4, torch.bfloat16)
    assert mask_bias(keep, 4, torch.bfloat16) is first  # cached
    lowest = torch.finfo(torch.bfloat16).min
    assert torch.equal(first, torch.zeros(2, 1, 4, 4, dtype=torch.bfloat16).masked_fill(~keep, lowest))
    keep[1, 0, 3, 0] = False  # in place: the version counter moves
    again = mask_bias(keep, 4, torch.bfloat16)
    assert again is not first and again[1, 0, 3, 0] == lowest and again[0, 0, 3, 0] == 0
    other = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    assert mask_bias(other, 4, torch.bfloat16).eq(0).all()
    assert mask_bias(other, 3, torch.float32).shape == (2, 1, 4, 3)
