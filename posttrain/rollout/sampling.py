"""Sampling presets for rollouts and evaluation (seed 000, section 3.3.2).

- Rollout (RL training): temperature 1.0, top_p 1.0, top_k off -- sample from the policy
  itself, for exploration, and so that the sampled tokens' probabilities are the policy's
  (a truncated or sharpened distribution biases on-policy importance ratios).
- Evaluation: the model's recommended settings (the sampling values in its
  ``generation_config.json`` when ``do_sample`` is true there), else greedy (temperature 0),
  for stable, reproducible scores.

Both accept overrides; `SamplingParams.to_metadata` is what runs record.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, ModelError

_SAMPLING_KEYS = ("temperature", "top_p", "top_k")


@dataclass
class SamplingParams:
    """How to sample completions; backend-neutral (HF generate, vLLM, search strategies)."""

    n: int = 1
    """Completions per prompt (the group size for GRPO-style estimators)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    max_new_tokens: int = 512
    """Generation budget per completion."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (the string itself is kept)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a completion, besides the tokenizer's eos."""
    seed: int | None = None
    """Sampling seed; None leaves the backend's generator as it is."""
    source: str = ""
    """Where these values came from (recorded in run metadata)."""

    def __post_init__(self) -> None:
        checks = {
            "n": self.n >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"invalid sampling value {key}={getattr(self, key)!r}",
                    where=f"sampling.{key}",
                    fix="n >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1",
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **overrides: Any) -> SamplingParams:
        """A copy with ``overrides`` applied; an unknown key is a ConfigError with a did-you-mean."""
        names = [f.name for f in dataclasses.fields(self) if f.name != "source"]
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(
                    f"unknown sampling setting {key!r}",
                    where=f"sampling.{key}",
                    fix=f"{hint}valid: {', '.join(names)}",
                )
        if not overrides:
            return dataclasses.replace(self)
        source = f"{self.source}; overridden: {', '.join(sorted(overrides))}".lstrip("; ")
        return dataclasses.replace(self, **overrides, source=source)

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-ready dict of every setting plus ``greedy``, for run metadata."""
        return {**dataclasses.asdict(self), "greedy": self.greedy}

    def to_generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for HF ``model.generate`` (``stop`` needs ``tokenizer=`` there too)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_return_sequences": self.n}
        if self.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.stop:
            kwargs["stop_strings"] = list(self.stop)
        return kwargs


def rollout_defaults(**overrides: Any) -> SamplingParams:
    """RL rollout sampling: temperature 1.0, top_p 1.0, top_k off (then ``overrides``)."""
    base = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, source="rollout default (temperature 1.0)")
    return base.replace(**overrides)


def _read_generation_config(source: str | os.PathLike | Any) -> tuple[dict, str]:
    """The generation settings as a plain dict, and a description of where they came from."""
    if source is None:
        return {}, "no generation config given"
    if isinstance(source, dict):
        return dict(source), "generation config dict"
    if hasattr(source, "to_diff_dict"):  # a transformers GenerationConfig
        return source.to_diff_dict(), "generation config"
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelError(
            "model folder does not exist", where=str(path), fix="pass a model folder or a GenerationConfig"
        )
    file = path / "generation_config.json" if path.is_dir() else path
    if not file.is_file():
        return {}, f"no generation_config.json in {path}"
    try:
        return json.loads(file.read_text(encoding="utf-8")), str(file)
    except json.JSONDecodeError as err:
        raise ModelError(
            f"invalid JSON: {err.msg}", where=f"{file}:{err.lineno}", fix="fix or delete the file"
        ) from None


def _stop_ids(eos: Any) -> list[int]:
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def eval_defaults(model_dir_or_generation_config: Any = None, **overrides: Any) -> SamplingParams:
    """Evaluation sampling: the model's recommended values, else greedy (then ``overrides``).

    The model's values (``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``) are used
    when its generation config sets ``do_sample: true``, as HF generate would; missing ones
    stay neutral (1.0 / 1.0 / 0). Otherwise temperature 0 (greedy). The config's
    ``eos_token_id`` (int or list) becomes ``stop_token_ids``. Accepts a model folder, a
    ``generation_config.json`` path, a ``GenerationConfig`` or a dict.
    """
    cfg, origin = _read_generation_config(model_dir_or_generation_config)
    values: dict[str, Any] = {"stop_token_ids": _stop_ids(cfg.get("eos_token_id"))}
    if cfg.get("max_new_tokens"):
        values["max_new_tokens"] = int(cfg["max_new_tokens"])
    if cfg.get("do_sample") is True:
        picked = {k: cfg[k] for k in _SAMPLING_KEYS if cfg.get(k) is not None}
        values.update(picked)
        listed = ", ".join(f"{k}={v}" for k, v in picked.items()) or "none listed: neutral 1.0 / 1.0 / 0"
        source = f"model's recommended sampling ({listed}) from {origin}"
    else:
        values["temperature"] = 0.0
        source = f"greedy ({origin} does not set do_sample: true)" if cfg else f"greedy ({origin})"
    return SamplingParams(**values, source=source).replace(**overrides)
