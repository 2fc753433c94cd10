"""Template-faithful per-turn samples on four real template formats; lint; add-tokens; per-turn export."""

from __future__ import annotations

import json

import pytest
import torch
from templates_fixtures import FAMILIES, TOOL_CHAT, TOOLS, build_family_tokenizer, conversation
from transformers import Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from posttrain.cli_templates import templates_app
from posttrain.data.render import IGNORE_INDEX, render_chat
from posttrain.data.templates import add_tokens, lint_template, per_turn_examples, tag_info
from posttrain.errors import DataError, ModelError
from posttrain.models.tokenizer import train_default_tokenizer

# Hand-written completions (first and second assistant turn of `conversation(name)`), and
# what the full rendering has after the last end-of-turn token (never trained).
R1_EOS = "<｜end▁of▁sentence｜>"
EXPECTED = {
    "chatml": (["5", "<|im_end|>"], ["Sure", "!", "<|im_end|>"], ["\n"]),
    "qwen3": (
        ["<think>", "\n", "Let", " ", "me", " ", "add", ".", "\n", "</think>", "\n", "\n", "5", "<|im_end|>"],
        ["<think>", "\n", "ok", "\n", "</think>", "\n", "\n", "Sure", "!", "<|im_end|>"],
        ["\n"],
    ),
    # The R1 generation prompt pre-fills "<think>\n", so the completion starts inside the block.
    "deepseek_r1": (
        ["Let", " ", "me", " ", "add", ".", "\n", "</think>", "\n", "\n", "5", R1_EOS],
        ["ok", "\n", "</think>", "\n", "\n", "Sure", "!", R1_EOS],
        [],
    ),
    "llama3": (["5", "<|eot_id|>"], ["Sure", "!", "<|eot_id|>"], []),
}
PREFIX_PRESERVING = {"chatml": True, "qwen3": False, "deepseek_r1": False, "llama3": True}


@pytest.fixture(scope="module")
def toks():
    return {name: build_family_tokenizer(name) for name in FAMILIES}


def chat_ids(tok, messages, gen, **kw):
    return tok.apply_chat_template(messages, add_generation_prompt=gen, **kw)["input_ids"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_per_turn_prompt_is_the_inference_prompt(toks, name):
    tok, conv = toks[name], conversation(name)
    rows = per_turn_examples(tok, conv, "conv.jsonl:1")
    assert [r["turn"] for r in rows] == [2, 4]
    for row, expected in zip(rows, EXPECTED[name][:2], strict=True):
        t = row["turn"]
        assert row["prompt_ids"] == chat_ids(tok, conv[:t], True)
        assert row["prompt"] == tok.apply_chat_template(conv[:t], add_generation_prompt=True, tokenize=False)
        assert tok.convert_ids_to_tokens(row["completion_ids"]) == expected
        assert tok(row["completion"], add_special_tokens=False)["input_ids"] == row["completion_ids"]
    # The last turn's prompt + completion is the full rendering up to its end-of-turn token.
    full = chat_ids(tok, conv, False)
    seq = rows[-1]["prompt_ids"] + rows[-1]["completion_ids"]
    assert full[: len(seq)] == seq
    assert tok.convert_ids_to_tokens(full[len(seq) :]) == EXPECTED[name][2]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_render_chat_masks(toks, name):
    tok, conv = toks[name], conversation(name)
    samples = render_chat(tok, conv)
    assert len(samples) == (1 if PREFIX_PRESERVING[name] else 2)
    trained = [
        t for s in samples for t, lab in zip(s.input_ids, s.labels, strict=True) if lab != IGNORE_INDEX
    ]
    first, second, _ = EXPECTED[name]
    assert tok.convert_ids_to_tokens(trained) == first + second
    eot = tok.convert_tokens_to_ids(first[-1])
    ends = [(s, i) for s in samples for i, lab in enumerate(s.labels) if lab == eot]
    assert len(ends) == 2  # each assistant turn's end-of-turn token is trained ...
    for s, i in ends:  # ... and whatever follows it is not
        assert i + 1 == len(s.input_ids) or s.labels[i + 1] == IGNORE_INDEX
    # Every assistant turn's inference prompt is a prefix of the sample that trains it.
    for t, s in zip([2, 4], samples * 2 if len(samples) == 1 else samples, strict=True):
        prompt = chat_ids(tok, conv[:t], True)
        assert s.input_ids[: len(prompt)] == prompt
        assert all(lab == IGNORE_INDEX for lab in s.labels[len(prompt) - 1 : len(prompt)])


def test_history_thoughts_are_stripped(toks):
    prompt = per_turn_examples(toks["deepseek_r1"], conversation("deepseek_r1"))[1]["prompt"]
    assert prompt == (
        "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>What is 2 + 3?<｜Assistant｜>\n\n5"
        "<｜end▁of▁sentence｜><｜User｜>One more?<｜Assistant｜><think>\n"
    )
    qwen = per_turn_examples(toks["qwen3"], conversation("qwen3"))[1]["prompt"]
    assert "Let me add" not in qwen and "<|im_start|>assistant\n5<|im_end|>\n" in qwen


def test_qwen3_tool_calls_and_responses(toks):
    tok = toks["qwen3"]
    rows = per_turn_examples(tok, TOOL_CHAT, tools=TOOLS)
    assert [r["turn"] for r in rows] == [1, 3, 5]
    for row in rows:
        assert row["prompt_ids"] == chat_ids(tok, TOOL_CHAT[: row["turn"]], True, tools=TOOLS)
    assert rows[0]["completion"] == (
        '<think>\nLet me check.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call><|im_end|>"
    )
    # Within the tool chain the thought is kept; after the next user query it is stripped.
    assert (
        "<tool_response>\nsunny\n</tool_response>" in rows[1]["prompt"]
        and "Let me check." in rows[1]["prompt"]
    )
    assert "Let me check." not in rows[2]["prompt"] and "<tool_call>" in rows[2]["prompt"]
    assert len(render_chat(tok, TOOL_CHAT, tools=TOOLS)) == 3


def _tiny_qwen2(vocab: int, tie: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(cfg).eval()


def _loss_sum(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_prefix_preserving_one_sequence_equals_sum_of_turns(toks, name):
    tok, conv = toks[name], conversation(name)
    model = _tiny_qwen2(len(tok))
    (single,) = render_chat(tok, conv)
    turns = per_turn_examples(tok, conv)
    with torch.no_grad():
        whole = _loss_sum(model, single.input_ids, single.labels)
        parts = sum(
            _loss_sum(
                model,
                r["prompt_ids"] + r["completion_ids"],
                [IGNORE_INDEX] * len(r["prompt_ids"]) + r["completion_ids"],
            )
            for r in turns
        )
    torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-5)
    assert len(single.input_ids) < sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in turns)


# --------------------------------------------------------------------------- bad input


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def llama3_dir(tmp_path, toks):
    toks["llama3"].save_pretrained(tmp_path / "llama3")
    return tmp_path / "llama3"


def _per_turn_cli(model_dir, conv_file, out):
    args = ["per-turn", "--model", str(model_dir), "--input", str(conv_file), "--output", str(out)]
    return CliRunner().invoke(templates_app, args)


@pytest.mark.parametrize(
    "bad, rule",
    [
        ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}],
         "Conversation roles must alternate"),
        ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "You are a bot."},
          {"role": "assistant", "content": "ok"}], "System message must be the first message"),
    ],
)  # fmt: skip
def test_template_rule_becomes_data_error_with_file_line(tmp_path, llama3_dir, bad, rule):
    good = {"messages": conversation("llama3")}
    conv = _write(tmp_path / "conv.jsonl", [good, {"messages": bad}])
    result = _per_turn_cli(llama3_dir, conv, tmp_path / "out.jsonl")
    err = result.exception
    assert isinstance(err, DataError)
    assert err.where == f"{conv}:2" and rule in err.message
    assert not (tmp_path / "out.jsonl").exists()


def test_unclosed_think_is_data_error(toks):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nLet me add. 5"}]
    with pytest.raises(DataError, match="never closed") as info:
        per_turn_examples(toks["qwen3"], conv, "c.jsonl:3")
    assert info.value.where == "c.jsonl:3"
    # A lone </think> is fine (R1-style generation prompts pre-fill the opening tag).
    (row,) = per_turn_examples(
        toks["qwen3"], [conv[0], {"role": "assistant", "content": "ok\n</think>\n\n5"}]
    )
    assert row["completion"] == "<think>\nok\n</think>\n\n5<|im_end|>"


def test_no_chat_template_is_model_error():
    tok = build_family_tokenizer("chatml")
    tok.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        lint_template(tok)
    with pytest.raises(ModelError):
        per_turn_examples(tok, conversation("chatml"))


def test_per_turn_cli_writes_one_line_per_assistant_turn(tmp_path, toks):
    toks["qwen3"].save_pretrained(tmp_path / "qwen3")
    conv = _write(
        tmp_path / "conv.jsonl",
        [{"messages": conversation("qwen3")}, {"messages": TOOL_CHAT, "tools": TOOLS}],
    )
    result = _per_turn_cli(tmp_path / "qwen3", conv, tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["where"], r["turn"]) for r in rows] == [
        (f"{conv}:1", 2), (f"{conv}:1", 4), (f"{conv}:2", 1), (f"{conv}:2", 3), (f"{conv}:2", 5)
    ]  # fmt: skip
    assert rows[0]["completion"] == "<think>\nLet me add.\n</think>\n\n5<|im_end|>"
    assert rows[4]["prompt_ids"] == chat_ids(toks["qwen3"], TOOL_CHAT[:5], True, tools=TOOLS)


# --------------------------------------------------------------------------- lint


@pytest.fixture(scope="module")
def default_tok():
    return train_default_tokenizer(
        ["Compute 11 + 16. <think>11 + 16 = 27</think> Answer: 27"] * 20, vocab_size=300
    )


def test_lint_default_tokenizer_is_ok(default_tok):
    report = lint_template(default_tok)
    assert [(t.tag, t.n_tokens, t.kind, t.single) for t in report.tags] == [
        ("<think>", 1, "added", True), ("</think>", 1, "added", True), ("<step>", 1, "added", True)
    ]  # fmt: skip
    assert report.generation_prompt == "<|im_start|>assistant\n"
    assert (report.end_of_turn, report.eot_is_eos, report.eot_trained) == ("<|im_end|>", True, True)
    assert report.prefix_preserving is False  # strips history thoughts
    assert report.verdict == "ok" and report.warnings == []


def test_lint_split_tags_say_so_and_give_the_fix(toks):
    report = lint_template(toks["chatml"], model_hint="models/smol")
    think, close, step = report.tags
    assert (think.n_tokens, think.pieces, think.kind) == (3, ["<", "think", ">"], "split")
    assert (close.n_tokens, close.pieces) == (4, ["<", "/", "think", ">"])
    assert report.verdict == "warnings" and report.prefix_preserving is True
    ((problem, fix),) = report.warnings
    assert "<think> takes 3 tokens" in problem and "broken variants" in problem
    assert (
        fix
        == "run `posttrain templates add-tokens models/smol OUT --tokens '<think>,</think>,<step>'` before SFT"
    )
    text = report.format()
    assert "SPLIT into 3: ['<', 'think', '>']" in text and "verdict: warnings" in text
    assert json.loads(json.dumps(report.to_dict()))["tags"][0]["single"] is False


def test_lint_families(toks):
    qwen, r1, llama = (lint_template(toks[n]) for n in ("qwen3", "deepseek_r1", "llama3"))
    assert qwen.switches == {"enable_thinking": True} and qwen.prefix_preserving is False
    assert r1.generation_prompt == "<｜Assistant｜><think>\n" and r1.eot_trained is True
    assert r1.prefix_preserving is False and r1.switches == {}
    assert (llama.end_of_turn, llama.eot_is_eos, llama.prefix_preserving) == ("<|eot_id|>", True, True)


def test_lint_warns_when_end_of_turn_is_not_eos():
    tok = build_family_tokenizer("llama3")
    tok.eos_token = "<|end_of_text|>"
    report = lint_template(tok, think_tags=(), step_sep=None)
    assert report.eot_is_eos is False
    assert any("eos_token_id" in fix for _, fix in report.warnings)


def test_lint_cli_json(tmp_path, default_tok):
    default_tok.save_pretrained(tmp_path / "tok")
    result = CliRunner().invoke(templates_app, ["lint", str(tmp_path / "tok"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"] == "ok" and data["tags"][1] == {
        **data["tags"][1],
        "tag": "</think>",
        "single": True,
    }


# --------------------------------------------------------------------------- add tokens


@pytest.mark.parametrize("tie", [True, False])
def test_add_tokens_single_and_mean_initialised(tie):
    tok = build_family_tokenizer("chatml")
    model = _tiny_qwen2(len(tok), tie=tie)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    model, tok, added = add_tokens(model, tok, ["<think>", "</think>", "think"])
    assert added == ["<think>", "</think>"]  # "think" is already a vocabulary entry
    assert [tag_info(tok, t).single for t in added] == [True, True]
    ids = tok.convert_tokens_to_ids(added)
    assert ids == [len(old_in), len(old_in) + 1] and model.get_input_embeddings().weight.shape[0] == len(tok)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    torch.testing.assert_close(new_in[ids], old_in.mean(0).expand(2, -1))
    torch.testing.assert_close(new_out[ids], old_out.mean(0).expand(2, -1))
    torch.testing.assert_close(new_in[: len(old_in)], old_in)  # existing rows untouched
    text = tok.apply_chat_template([{"role": "user", "content": "<think>\nHi\n</think>"}])["input_ids"]
    assert ids[0] in text and torch.isfinite(model(torch.tensor([text])).logits).all()
    _, _, again = add_tokens(model, tok, ["<think>", "</think>"])
    assert again == [] and model.get_input_embeddings().weight.shape[0] == len(tok)


def test_add_tokens_cli_saves_a_loadable_folder(tmp_path):
    from posttrain.models.load import load_model, load_tokenizer, save_hf_folder

    tok = build_family_tokenizer("chatml")
    save_hf_folder(_tiny_qwen2(len(tok)), tok, tmp_path / "in")
    result = CliRunner().invoke(templates_app, ["add-tokens", str(tmp_path / "in"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "<think>: added, 1 token(s)" in result.output
    tok2 = load_tokenizer(tmp_path / "out")
    assert len(tok2) == len(tok) + 2 and load_model(
        tmp_path / "out", device="cpu"
    ).get_input_embeddings().weight.shape[0] == len(tok2)
    assert lint_template(tok2, step_sep=None).tags[0].single
