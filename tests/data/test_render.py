"""Chat rendering: loss masks by role, per-turn samples, prefix preservation, truncation."""

from __future__ import annotations

import logging

import pytest

from posttrain.data.loaders import Record
from posttrain.data.render import (
    IGNORE_INDEX,
    Sample,
    end_of_turn,
    format_summary_table,
    is_prefix_preserving,
    render_chat,
    render_prompt_completion,
    render_records,
    summarize,
    truncate,
)
from posttrain.errors import DataError

_ = "_"  # an untrained position in expected label lists


def toks(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def trained(tok, sample):
    return [
        t if lab != IGNORE_INDEX else _
        for t, lab in zip(toks(tok, sample.input_ids), sample.labels, strict=True)
    ]


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


SIMPLE = [
    {"role": "system", "content": "You are a bot."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
]


def test_chatml_masks_by_role(chatml_tok):
    (s,) = render_chat(chatml_tok, SIMPLE)
    # System and user tokens, the assistant header and the final "\n" are never trained;
    # the reply and its <|im_end|> are.
    assert toks(chatml_tok, s.input_ids) == [
        "<|im_start|>", "system", "\n", "You", " ", "are", " ", "a", " ", "bot", ".", "<|im_end|>", "\n",
        "<|im_start|>", "user", "\n", "Hi", "<|im_end|>", "\n",
        "<|im_start|>", "assistant", "\n", "Hello", " ", "there", "<|im_end|>",
    ]  # fmt: skip
    assert trained(chatml_tok, s) == [_] * 22 + ["Hello", " ", "there", "<|im_end|>"]


def test_chatml_multi_turn_one_sample(chatml_tok, multi_turn):
    (s,) = render_chat(chatml_tok, multi_turn)
    full = chatml_tok.apply_chat_template(multi_turn, tokenize=False)
    assert full.endswith("<|im_end|>\n")
    # The sample is the whole rendering minus the trailing "\n" after the last <|im_end|>.
    assert s.input_ids == encode(chatml_tok, full)[:-1]
    labels = [t for t in trained(chatml_tok, s) if t != _]
    assert labels == ["5", "<|im_end|>", "Sure", "!", "<|im_end|>"]
    # The "\n" after the first reply's <|im_end|> is in the sample but untrained.
    i = s.input_ids.index(chatml_tok.convert_tokens_to_ids("5"))
    assert toks(chatml_tok, s.input_ids[i : i + 3]) == ["5", "<|im_end|>", "\n"]
    assert s.labels[i + 2] == IGNORE_INDEX


def test_prefix_preserving_equals_union_of_per_turn_completions(chatml_tok, multi_turn):
    (single,) = render_chat(chatml_tok, multi_turn)
    union = []
    for t in (2, 4):
        pc = render_prompt_completion(chatml_tok, multi_turn[:t], [multi_turn[t]])
        union += [lab for lab in pc.labels if lab != IGNORE_INDEX]
        # Each per-turn prompt is exactly a prefix of the single sample.
        n_prompt = pc.labels.index(next(lab for lab in pc.labels if lab != IGNORE_INDEX))
        assert single.input_ids[:n_prompt] == pc.input_ids[:n_prompt]
    assert [lab for lab in single.labels if lab != IGNORE_INDEX] == union


def test_qwen3_style_gives_one_sample_per_turn(qwen3_tok, multi_turn):
    samples = render_chat(qwen3_tok, multi_turn, where="x.jsonl:1")
    assert len(samples) == 2
    for s, t in zip(samples, (2, 4), strict=True):
        prompt_text = qwen3_tok.apply_chat_template(
            multi_turn[:t], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = qwen3_tok.apply_chat_template(multi_turn[:t], add_generation_prompt=True)["input_ids"]
        n = len(prompt_ids)
        assert s.input_ids[:n] == encode(qwen3_tok, prompt_text) == prompt_ids
        assert s.labels[:n] == [IGNORE_INDEX] * n
        assert all(lab != IGNORE_INDEX for lab in s.labels[n:])
        assert s.where == f"x.jsonl:1 messages[{t}]"
    # Turn 2 is rendered with its reasoning; in turn 4's prompt that reasoning is gone.
    assert [t for t in trained(qwen3_tok, samples[0]) if t != _] == [
        "<think>", "\n", "Let", " ", "me", " ", "add", ".", "\n", "</think>", "\n", "\n", "5", "<|im_end|>",
    ]  # fmt: skip
    assert "Let" not in toks(qwen3_tok, samples[1].input_ids)
    assert [t for t in trained(qwen3_tok, samples[1]) if t != _] == [
        "<think>", "\n", "ok", "\n", "</think>", "\n", "\n", "Sure", "!", "<|im_end|>",
    ]  # fmt: skip


def test_is_prefix_preserving(chatml_tok, qwen3_tok, multi_turn):
    assert is_prefix_preserving(chatml_tok, multi_turn)
    assert not is_prefix_preserving(qwen3_tok, multi_turn)
    # With a single assistant turn nothing can be rewritten.
    assert is_prefix_preserving(qwen3_tok, multi_turn[:3])
    assert len(render_chat(qwen3_tok, multi_turn[:3])) == 1


def test_train_on_last_and_all(chatml_tok, qwen3_tok, multi_turn):
    (last,) = render_chat(chatml_tok, multi_turn, train_on="last")
    assert [t for t in trained(chatml_tok, last) if t != _] == ["Sure", "!", "<|im_end|>"]
    (everything,) = render_chat(chatml_tok, multi_turn, train_on="all")
    assert everything.labels == everything.input_ids
    with pytest.raises(DataError, match="train_on='all' needs a prefix-preserving"):
        render_chat(qwen3_tok, multi_turn, train_on="all")


def test_end_of_turn_is_probed(chatml_tok, make_tokenizer):
    assert end_of_turn(chatml_tok) == "<|im_end|>"
    llama2_like = make_tokenizer(
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + m['content'] + ' ' + eos_token }}{%- endif -%}{%- endfor -%}"
    )
    assert end_of_turn(llama2_like) == " <|im_end|>"


def test_template_without_end_token_appends_eos_and_splits_turns(multi_turn, make_tokenizer):
    tok = make_tokenizer(
        "{%- for m in messages -%}{{ m['role'] + ' : ' + m['content'] + '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'assistant : ' }}{%- endif -%}"
    )
    assert end_of_turn(tok) is None
    samples = render_chat(tok, multi_turn)
    assert len(samples) == 2  # an eos mid-conversation would change later prompts
    assert [t for t in trained(tok, samples[1]) if t != _] == ["Sure", "!", "\n", "<|im_end|>"]


def test_prompt_completion_plain_strings_without_template(plain_tok):
    s = render_prompt_completion(plain_tok, "What is 2 + 3?", "5")
    assert toks(plain_tok, s.input_ids) == [
        "What",
        " ",
        "is",
        " ",
        "2",
        " ",
        "+",
        " ",
        "3",
        "?",
        "5",
        "<|im_end|>",
    ]
    assert trained(plain_tok, s) == [_] * 10 + ["5", "<|im_end|>"]
    again = render_prompt_completion(plain_tok, "Hi", "ok<|im_end|>")
    assert toks(plain_tok, again.input_ids) == ["Hi", "ok", "<|im_end|>"]  # eos not doubled


def test_prompt_completion_with_template_matches_chat(chatml_tok):
    s = render_prompt_completion(chatml_tok, "Hi", "Hello there")
    (chat,) = render_chat(
        chatml_tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    )
    assert (s.input_ids, s.labels) == (chat.input_ids, chat.labels)


def test_no_chat_template_is_an_error(plain_tok):
    with pytest.raises(DataError, match="no chat template") as e:
        render_chat(plain_tok, SIMPLE, where="d.jsonl:4")
    assert "d.jsonl:4" in str(e.value) and "Fix:" in str(e.value)
    with pytest.raises(DataError, match="needs a chat template"):
        render_prompt_completion(plain_tok, SIMPLE[:2], [SIMPLE[2]])


def test_bad_conversations(chatml_tok, make_tokenizer):
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]
    with pytest.raises(DataError, match=r"messages\[1\]: the template renders an empty assistant reply"):
        render_chat(chatml_tok, empty)
    with pytest.raises(DataError, match="no assistant turn"):
        render_chat(chatml_tok, SIMPLE[:2])
    with pytest.raises(DataError, match=r"messages\[0\] is an assistant turn"):
        render_chat(chatml_tok, [{"role": "assistant", "content": "Hi"}])
    # A generation prompt that the rendered turn does not start with.
    broken = make_tokenizer(
        chatml_tok.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    )
    with pytest.raises(DataError, match="does not start with the generation prompt"):
        render_chat(broken, SIMPLE, where="c.jsonl:9")


def test_render_records_logs_mode_once(qwen3_tok, multi_turn, caplog):
    records = [Record({"messages": multi_turn}, f"f.jsonl:{i}", "chat") for i in range(3)]
    records.append(
        Record({"prompt": [SIMPLE[1]], "completion": [SIMPLE[2]]}, "f.jsonl:4", "prompt_completion")
    )
    with caplog.at_level(logging.INFO, logger="posttrain.data.render"):
        samples = render_records(qwen3_tok, records)
    assert len(samples) == 3 * 2 + 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert any("3 record(s) not prefix-preserving" in line and "strips <think>" in line for line in lines)
    with pytest.raises(DataError, match="preference records cannot be rendered"):
        render_records(qwen3_tok, [Record({}, "p.jsonl:1", "preference")])


def _sample(n, n_prompt):
    ids = list(range(1, n + 1))
    return Sample(ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:], "s")


def test_truncate_and_drop_are_counted():
    samples = [_sample(5, 2), _sample(12, 3), _sample(20, 15)]
    kept, stats = truncate(samples, 10, "truncate")
    assert [len(s.input_ids) for s in kept] == [5, 10]
    assert (
        kept[1].n_trunc == 2
        and kept[1].labels[:3] == [IGNORE_INDEX] * 3
        and kept[1].labels[3:] == list(range(4, 11))
    )
    assert stats == {"truncated": 1, "dropped": 0, "dropped_no_target": 1, "tokens_removed": 12}
    kept, stats = truncate(samples, 10, "drop")
    assert [len(s.input_ids) for s in kept] == [5]
    assert stats == {"truncated": 0, "dropped": 2, "dropped_no_target": 0, "tokens_removed": 32}


def test_summarize_and_table(chatml_tok):
    (chat,) = render_chat(chatml_tok, SIMPLE)  # 26 tokens, 4 trained, ends in <|im_end|>
    cut, trunc = truncate([chat, _sample(30, 20), _sample(40, 30)], 26, "truncate")
    stats = summarize(cut, chatml_tok, trunc)
    assert stats["samples"] == 2 and stats["tokens"] == 26 + 26
    assert stats["trained_tokens"] == 4 + 6
    assert stats["masked_fraction"] == pytest.approx(1 - 10 / 52)
    assert stats["dropped_no_target"] == 1 and stats["dropped"] == 0
    assert stats["truncated"] == 1 and stats["no_stop"] == 1 and stats["max_len"] == 26
    table = format_summary_table(stats)
    assert "trained tokens" in table and "80.8%" in table and "dropped (no target left)" in table


def test_token_boundary_merge_falls_back_to_per_turn(make_tokenizer, multi_turn):
    # No separator between role and content: "assistant" + "5" tokenises as one word
    # when the whole prompt is encoded, so a single sample would not reproduce the
    # inference-time prompt ids of the second turn.
    tok = make_tokenizer(
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + m['content'] + '<|im_end|>' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant' }}{%- endif -%}"
    )
    assert is_prefix_preserving(tok, multi_turn)  # text-level
    samples = render_chat(tok, multi_turn)
    assert len(samples) == 2
    prompt = tok.apply_chat_template(multi_turn[:4], add_generation_prompt=True)["input_ids"]
    assert samples[1].input_ids[: len(prompt)] == prompt
