"""Tokenizers for the rollout tests: the embedded default (Qwen3-style, strips history thoughts)
and the same vocabulary with a plain ChatML template (prefix-preserving)."""

from __future__ import annotations

import pytest

from posttrain.models.tokenizer import train_default_tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["What is 2 + 3? Let me add. The answer is 5. One more? Sure! Thanks."] * 20


@pytest.fixture(scope="session")
def thinking_tok():
    return train_default_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def chatml_tok():
    tok = train_default_tokenizer(CORPUS, vocab_size=300)
    tok.chat_template = CHATML
    return tok


def reply(thought: str, answer: str) -> dict:
    return {"role": "assistant", "content": answer, "reasoning_content": thought}


@pytest.fixture
def three_turns() -> list[dict]:
    return [
        {"role": "user", "content": "What is 2 + 3?"},
        reply("Let me add.", "5"),
        {"role": "user", "content": "One more?"},
        reply("ok", "Sure!"),
        {"role": "user", "content": "Thanks."},
        reply("ok", "Bye."),
    ]
