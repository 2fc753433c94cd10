"""Scalar heads: shapes, seeded init, where outcome and process RMs read, save/load round trips."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models.heads import (
    RewardModel,
    ScalarHead,
    last_token_values,
    load_reward_model,
    prm_response,
    save_reward_model,
    single_token_id,
    step_end_mask,
)
from posttrain.models.load import load_model, load_tokenizer
from posttrain.models.peft import PeftConfig, apply_peft


def test_scalar_head_shape_and_seeded_init():
    torch.manual_seed(123)
    a, b, c = ScalarHead(16, seed=1), ScalarHead(16, seed=1), ScalarHead(16, seed=2)
    assert torch.equal(a.linear.weight, b.linear.weight) and not torch.equal(a.linear.weight, c.linear.weight)
    assert a.linear.bias.item() == 0.0
    h = torch.randn(3, 5, 16)
    v = a(h)
    assert v.shape == (3, 5)
    torch.testing.assert_close(v, (h @ a.linear.weight.t()).squeeze(-1))


def test_last_token_values_right_and_left_padding():
    values = torch.arange(12.0).view(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert last_token_values(values, right).tolist() == [2.0, 11.0]
    assert last_token_values(values, left).tolist() == [5.0, 11.0]


def test_step_end_mask_reads_separators_in_the_response_and_the_end_token():
    sep, end = 5, 7
    #                   prompt  | response ...............................
    ids = torch.tensor([[5, 1, 2, 3, 5, 4, 5, 4, 7, 4, 5, 0]])
    start = torch.tensor([2])
    got = step_end_mask(ids, start, sep, end)[0].nonzero().flatten().tolist()
    assert got == [4, 6, 8]  # the prompt's separator and the one after </think> are not steps
    no_end = step_end_mask(ids, start, sep, None)[0].nonzero().flatten().tolist()
    assert no_end == [4, 6, 10]
    cut = step_end_mask(ids[:, :8], start, sep, end)[0].nonzero().flatten().tolist()
    assert cut == [4, 6]  # chain cut before its end token: the last step is unscored


def test_prm_response_format():
    assert prm_response(["a", "b"], "<step>", "</think>", "Answer: 3") == "<think>a<step>b</think>\nAnswer: 3"
    assert prm_response(["a", "b"], "\n", "") == "a\nb\n"


def test_single_token_id_names_the_add_tokens_fix(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert single_token_id(tok, "<step>", "step_sep") == tok.convert_tokens_to_ids("<step>")
    with pytest.raises(ModelError, match="add-tokens"):
        single_token_id(tok, "STEP-END", "step_sep")


def _model(path, seed=0, peft=None):
    lm = load_model(path, dtype="float32", device="cpu")
    if peft is not None:
        lm = apply_peft(lm, peft)
    return RewardModel(lm, ScalarHead(lm.config.hidden_size, seed=seed), {"kind": "orm"})


def test_reward_model_values_depend_on_the_prefix_only(tiny_model_dir):
    model = _model(tiny_model_dir).eval()
    ids = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 40]])
    with torch.no_grad():
        v = model(ids, torch.ones_like(ids))
    assert v.shape == (2, 4)
    torch.testing.assert_close(v[0, :3], v[1, :3])  # causal: position 3 changes only itself
    assert v[0, 3] != v[1, 3]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_save_and_load_reward_model_round_trip(tmp_path, tiny_model_dir, method):
    peft = PeftConfig(method=method, r=4)
    model = _model(tiny_model_dir, seed=3, peft=peft)
    with torch.no_grad():
        model.head.linear.bias.fill_(0.25)
        if method == "lora":  # make the adapter non-zero so merging matters
            for name, p in model.backbone.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    with torch.no_grad():
        want = model.eval()(ids, torch.ones_like(ids))
    tok = load_tokenizer(tiny_model_dir)
    out = save_reward_model(model, tok, tmp_path / "rm", peft, {"kind": "prm", "step_sep": "<step>"})
    loaded, tok2 = load_reward_model(out, device="cpu")
    assert loaded.info["kind"] == "prm" and loaded.info["hidden_size"] == 64 and len(tok2) == len(tok)
    assert not (out / "adapter_config.json").exists()
    with torch.no_grad():
        got = loaded(ids, torch.ones_like(ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_load_reward_model_rejects_a_plain_model_folder(tiny_model_dir):
    with pytest.raises(ModelError, match="reward_head.json"):
        load_reward_model(tiny_model_dir)
