"""The embedded default tokenizer: digits, markers, round trips, the thinking chat template."""

from __future__ import annotations

import jinja2
import pytest
from transformers import AutoTokenizer

from posttrain.models.tokenizer import (
    DEFAULT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    STEP_TOKEN,
    THINK_CLOSE,
    THINK_OPEN,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "<think>\nold thought\n</think>\n\na1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2", "reasoning_content": "new thought"},
]


def test_every_digit_is_one_token(tokenizer):
    # The corpus repeats "11", "16", "27", "41" often enough that a plain BPE would merge them.
    ids = tokenizer.encode("27 + 14 = 41 and 1234567890", add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digits == list("271441") + list("1234567890")


@pytest.mark.parametrize(
    "marker", [PAD_TOKEN, "<|im_start|>", EOS_TOKEN, THINK_OPEN, THINK_CLOSE, STEP_TOKEN]
)
def test_markers_are_single_tokens(tokenizer, marker):
    ids = tokenizer.encode(f"a{marker}b", add_special_tokens=False)
    assert len(ids) == 3
    assert tokenizer.convert_ids_to_tokens(ids[1]) == marker


def test_special_vs_marker_tokens(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = f"<|im_start|>x{THINK_OPEN}r{THINK_CLOSE}1{STEP_TOKEN}2{EOS_TOKEN}{PAD_TOKEN}"
    # Think/step markers survive skip_special_tokens (as Qwen3's think tags do); ChatML ones don't.
    kept = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert kept == f"x{THINK_OPEN}r{THINK_CLOSE}1{STEP_TOKEN}2"


@pytest.mark.parametrize(
    "text",
    [
        "héllo 世界 \t\n  x  ",
        "  leading and trailing  ",
        "emoji 🙂 and 'quotes' , . !",
        "<think>\n1+1=2\n</think>\n\n2",
    ],
)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_template_strips_history_thoughts_keeps_last(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nnew thought\n</think>\n\na2<|im_end|>\n"
    )


def test_inline_think_of_last_turn_is_kept(tokenizer):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>\nA: 4"}]
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\nr\n</think>\n\nA: 4<|im_end|>\n")


def test_generation_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("q2<|im_end|>\n<|im_start|>assistant\n")
    assert "old thought" not in rendered


def test_tool_turns_render_like_qwen3(tokenizer):
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "rain"},
        {"role": "tool", "content": "5C"},
    ]
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert '<tool_call>\n{"name": "get", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n' in rendered
    assert rendered.endswith(
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n<tool_response>\n5C\n</tool_response><|im_end|>\n"
    )


def test_unknown_role_raises(tokenizer):
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, padding_side="left")
    assert loaded.chat_template == DEFAULT_TEMPLATE
    assert loaded.padding_side == "left"
    assert (loaded.eos_token, loaded.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert loaded.model_max_length == tokenizer.model_max_length
    text = f"{THINK_OPEN}12 + 3{THINK_CLOSE}{STEP_TOKEN} done"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )
