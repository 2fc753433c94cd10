"""The rollout engine protocol (generate, update_weights) and the backend registry.

A backend turns prompts into completions with per-token log-probs and takes new weights
from the trainer; nothing else. ``hf`` (`posttrain.rollout.hf_engine`, the reference, any
device) and ``vllm`` (`posttrain.rollout.vllm_engine`, CUDA, the ``[gpu]`` extra) are
built in; `register_engine` adds others. Backends are imported only when asked for.

Log-prob convention shared by every backend: ``Completion.logprobs[t]`` is
log softmax(logits_t / T)[token_t] with T the sampling temperature (1 for greedy), before
top-k / top-p truncation -- what `posttrain.train.lm_loss.token_logprobs(..., temperature=T)`
recomputes, so the first PPO epoch can use them as the "old" log-probs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from posttrain.errors import ConfigError, DataError
from posttrain.rollout.sampling import SamplingParams

FinishReason = Literal["stop", "length"]
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]] | Mapping[str, Any]
"""A raw string, token ids, a chat message list, or a prompt record ``{"prompt": ...}``."""


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    """Position of the prompt in the list given to ``generate``."""
    sample_index: int
    """Which of the prompt's ``n`` samples this is (0..n-1)."""
    prompt_ids: list[int]
    """The prompt's token ids as the model saw them (chat template applied)."""
    token_ids: list[int]
    """Generated ids, including the stop token (eos / stop id) when the completion stopped on one."""
    text: str
    """``token_ids`` decoded without special tokens."""
    logprobs: list[float] = field(default_factory=list)
    """log pi(token_t | prefix) per generated token (convention in the module docstring)."""
    finish_reason: FinishReason = "length"
    """``stop``: eos, a stop id or a stop string; ``length``: hit max_new_tokens."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What trainers, evaluators and search strategies need from a generation backend."""

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions per prompt, ordered by (prompt_index, sample_index)."""
        ...

    def update_weights(self, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Make the next ``generate`` use these weights (a module or a state dict)."""
        ...


EngineFactory = Callable[..., RolloutEngine]
ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Add a backend: ``factory(**kwargs)`` builds the engine for ``get_engine(name, **kwargs)``."""
    ENGINES[name] = factory


def _hf(**kwargs: Any) -> RolloutEngine:
    from posttrain.rollout.hf_engine import HFEngine

    return HFEngine(**kwargs)


def _vllm(**kwargs: Any) -> RolloutEngine:
    from posttrain.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(**kwargs)


register_engine("hf", _hf)
register_engine("vllm", _vllm)


def get_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """Build the backend ``name`` ("hf" | "vllm" | registered); an unknown name lists the valid ones."""
    if name not in ENGINES:
        raise ConfigError(
            f"unknown rollout backend {name!r}",
            where="rollout.backend",
            fix=f"valid: {', '.join(sorted(ENGINES))}",
        )
    return ENGINES[name](**kwargs)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of one prompt: chat messages get the chat template plus the generation prompt,
    strings are tokenized as ``tokenizer(text)`` would (special tokens such as BOS included)."""
    ids = _encode(tokenizer, prompt)
    if not ids:
        raise DataError("a prompt encodes to no tokens", where=f"prompt {str(prompt)[:80]!r}")
    return ids


def _encode(tokenizer: Any, prompt: Prompt) -> list[int]:
    if isinstance(prompt, Mapping):
        if "prompt" not in prompt:
            raise DataError("a prompt record needs a 'prompt' key", where=f"prompt keys {sorted(prompt)}")
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    items = list(prompt)
    if items and all(isinstance(m, Mapping) for m in items):
        ids = tokenizer.apply_chat_template(items, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    if items and all(isinstance(t, int) for t in items):
        return items
    raise DataError(
        "a prompt must be a string, token ids, a list of chat messages or {'prompt': ...}",
        where=f"prompt {str(prompt)[:80]!r}",
    )


def by_prompt(completions: Sequence[Completion]) -> list[list[Completion]]:
    """Group completions per prompt (the GRPO groups), in prompt order."""
    groups: dict[int, list[Completion]] = {}
    for c in completions:
        groups.setdefault(c.prompt_index, []).append(c)
    return [groups[i] for i in sorted(groups)]
