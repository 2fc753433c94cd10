"""A tiny word-level tokenizer with two chat templates (ChatML and a Qwen3-style one).

Words, punctuation runs and every single whitespace character are separate
tokens, so expected token lists can be written by hand.
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]
WORDS = [
    "system",
    "user",
    "assistant",
    "tool",
    "You",
    "are",
    "helpful",
    "a",
    "bot",
    "Hi",
    "Hello",
    "there",
    "What",
    "is",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "+",
    "=",
    "?",
    ".",
    ",",
    "!",
    "It",
    "Let",
    "me",
    "add",
    "think",
    "sum",
    "the",
    "answer",
    "and",
    "ok",
    "Thanks",
    "Bye",
    "Sure",
    "yes",
    "no",
    "One",
    "more",
    "Two",
] + [" ", "\n"]

# Plain ChatML: history is never rewritten, so it is prefix-preserving.
CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3-style: assistant turns after the last user message show their <think>
# block (the final one always, even if empty); earlier turns lose it.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set r = m.get('reasoning_content', '') -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or r) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + r + '\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + THINK + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    # Like Qwen3: think tags are added tokens but not special.
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def make_tokenizer():
    """The tokenizer factory: ``make_tokenizer(chat_template_or_None)``."""
    return build_tokenizer


@pytest.fixture(scope="session")
def chatml_tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(CHATML)


@pytest.fixture(scope="session")
def qwen3_tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(QWEN3_STYLE)


@pytest.fixture(scope="session")
def plain_tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(None)


@pytest.fixture
def multi_turn() -> list[dict]:
    """System + two user/assistant exchanges, both replies with reasoning."""
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5", "reasoning_content": "Let me add."},
        {"role": "user", "content": "One more?"},
        {"role": "assistant", "content": "Sure!", "reasoning_content": "ok"},
    ]
