"""Scorers by name, as a recipe writes them, and which of them are oracles.

Names (``scorer:`` of a search recipe, a strategy, or the self-improvement loop):

- ``verifier`` -- the true answer check (the task's verifier, or the reward named by a prompt
  record's ``metadata.scorer``). **Oracle**: it knows the ground truth.
- ``oracle_prm`` -- every step checked against the task (`TaskStepScorer`). **Oracle**.
- ``majority`` -- a finished path scores the share of the finished paths of the same prompt in
  the same scorer call whose answer equals its own (best-of-N with it = majority vote);
  unfinished paths score 0. Learned from nothing, no oracle.
- ``orm:PATH`` -- an outcome reward model folder (`posttrain rm`): r(x, y) on the last step.
- ``prm:PATH`` or ``prm:AGG:PATH`` -- a process reward model folder (`posttrain prm`), AGG one of
  min (default), last, mean, product. Step i scores AGG(p_1..p_i), so a strategy reading the
  last step's score (``how: last``, ``select: prm_last``) ranks by AGG over the whole path.
- ``conf:PATH`` or ``conf:AGG:PATH`` -- a confidence PRM folder (`posttrain prm-conf`): step scores
  from the frozen policy's own token log-probs through a learned head
  (`posttrain.search.confidence`), AGG as for ``prm:``. It ranks the chains of one question, where a
  fine-tuned PRM mostly learns which questions are hard.
- ``value:PATH`` -- a value model: a PRM-format folder trained on Monte-Carlo values (the value
  of a prefix is the head's probability at its last step end), or a policy folder holding a PPO
  critic (``value_head.safetensors``; the value at the path's last token).
- ``none`` -- no scorer. A bare folder path is read as ``orm:``/``prm:`` by its saved kind.

A path that is not a reward or value model folder is a ConfigError naming the recipe key.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.search.protocols import ScoreRequest

PLAIN_SCORERS = ("verifier", "oracle_prm", "majority", "none")
ORACLE_SCORERS = ("verifier", "oracle_prm")
MODEL_KINDS = ("orm", "prm", "value", "conf")
AGGS = ("min", "last", "mean", "product")


@dataclass(frozen=True)
class ScorerSpec:
    """A parsed scorer name."""

    kind: str
    """verifier | oracle_prm | majority | none | orm | prm | value | conf."""
    path: str = ""
    """The model folder (orm, prm, value)."""
    agg: str = "min"
    """How a PRM's step probabilities combine along a path (prm and conf only)."""

    @property
    def oracle(self) -> bool:
        return self.kind in ORACLE_SCORERS


def _model_kind(path: str, where: str) -> str:
    """The saved kind of a reward/value folder: orm, prm, value, or critic (a PPO value head)."""
    folder = Path(path).expanduser()
    if (folder / "conf_head.json").is_file():
        return "conf"
    head = folder / "reward_head.json"
    if head.is_file():
        return str(json.loads(head.read_text()).get("kind", "orm"))
    if (folder / "value_head.safetensors").is_file():
        return "critic"
    what = "does not exist" if not folder.exists() else "is not a reward or value model folder"
    raise ConfigError(
        f"scorer path {path!r} {what} (no reward_head.json, conf_head.json or value_head.safetensors)",
        where=where,
        fix="point at the final/ folder of `posttrain rm` (orm:PATH), `posttrain prm` (prm:PATH) or a "
        "PPO run (value:PATH), `posttrain prm-conf` (conf:PATH), or use verifier / oracle_prm / majority",
    )


def parse_scorer(name: str, where: str = "scorer") -> ScorerSpec:
    """``name`` as a `ScorerSpec`; model folders are checked to exist and be of the named kind."""
    if name in PLAIN_SCORERS:
        return ScorerSpec(name)
    kind, _, rest = name.partition(":")
    if kind not in MODEL_KINDS or not rest:
        if Path(name).is_dir():  # a bare folder: its saved kind decides
            saved = _model_kind(name, where)
            return ScorerSpec("value" if saved == "critic" else saved, name)
        raise ConfigError(
            f"unknown scorer {name!r}",
            where=where,
            fix=f"use one of {', '.join(PLAIN_SCORERS)}, orm:PATH, prm:PATH, prm:min|last|mean|product:PATH, "
            "conf:PATH, conf:AGG:PATH or value:PATH",
        )
    agg, _, path = rest.partition(":")
    if kind not in ("prm", "conf") or agg not in AGGS or not path:
        agg, path = "min", rest
    saved = _model_kind(path, where)
    allowed = {"orm": ("orm",), "prm": ("prm",), "value": ("prm", "value", "critic"), "conf": ("conf",)}[kind]
    if saved not in allowed:
        raise ConfigError(
            f"scorer {name!r}: the folder holds a {saved} model, not a {kind}",
            where=where,
            fix=f"write {saved if saved in ('prm', 'conf') else 'orm'}:{path}",
        )
    return ScorerSpec(kind, path, agg)


def _answer(text: str) -> str | None:
    from posttrain.data.tasks import extract_answer

    return extract_answer(text)


@dataclass
class MajorityScorer:
    """Vote share: a finished path scores the fraction of finished paths of its prompt (in this
    call) with the same answer; no answer or an unfinished path scores 0."""

    num_parameters: int = 0

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        answers = [_answer(r.text) if r.terminal else None for r in requests]
        votes: dict[str, Counter] = defaultdict(Counter)
        done: Counter = Counter()
        for r, a in zip(requests, answers, strict=True):
            if r.terminal:
                done[r.prompt] += 1
                if a is not None:
                    votes[r.prompt][a] += 1
        out = []
        for r, a in zip(requests, answers, strict=True):
            share = votes[r.prompt][a] / done[r.prompt] if a is not None else 0.0
            out.append([0.0] * (max(len(r.steps), 1) - 1) + [share])
        return out


def running(scores: list[float], agg: str) -> list[float]:
    """``[AGG(s_1), AGG(s_1, s_2), ...]``: a path's aggregate at each of its steps."""
    from posttrain.rewards.models import aggregate_steps

    return [aggregate_steps(scores[: i + 1], agg) for i in range(len(scores))]


@dataclass
class AggregatedScorer:
    """A PRM whose step i carries AGG over steps 1..i (see `running`)."""

    inner: Any
    agg: str = "min"

    @property
    def num_parameters(self) -> int:
        return int(getattr(self.inner, "num_parameters", 0))

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        return [running(row, self.agg) for row in self.inner.score(requests)]


class CriticScorer:
    """A PPO critic (policy backbone + ``value_head.safetensors``): V at the path's last token."""

    def __init__(self, path: str, batch_size: int = 16):
        from posttrain.models.heads import load_value_head
        from posttrain.models.load import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, tokenizer=self.tokenizer).eval()
        self.head = load_value_head(path).to(next(self.model.parameters()).device)
        self.batch_size = batch_size

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        import torch

        from posttrain.data.collate import pad_collate
        from posttrain.data.render import Sample
        from posttrain.models.heads import backbone_lm, last_token_values

        device = next(self.model.parameters()).device
        values: list[float] = []
        for k in range(0, len(requests), self.batch_size):
            chunk = requests[k : k + self.batch_size]
            ids = [self.tokenizer(r.prompt + r.text, add_special_tokens=False)["input_ids"] for r in chunk]
            batch = pad_collate([Sample(x, x) for x in ids], self.tokenizer.pad_token_id)
            mask = batch["attention_mask"].to(device)
            with torch.no_grad():
                hidden = (
                    backbone_lm(self.model)
                    .get_decoder()(input_ids=batch["input_ids"].to(device), attention_mask=mask)
                    .last_hidden_state
                )
                values += [float(v) for v in last_token_values(self.head(hidden), mask)]
        return [[0.0] * (max(len(r.steps), 1) - 1) + [v] for r, v in zip(requests, values, strict=True)]


def build_scorer(spec: ScorerSpec, step_sep: str = "<step>") -> Any:
    """The `Scorer` object of a parsed name (None for ``none``); oracle scorers carry ``oracle=True``."""
    from posttrain.search.scorers import RewardModelScorer, TaskStepScorer, any_verifier

    if spec.kind == "none":
        return None
    if spec.kind == "verifier":
        scorer: Any = any_verifier()
    elif spec.kind == "oracle_prm":
        scorer = TaskStepScorer(step_sep=step_sep)
    elif spec.kind == "majority":
        return MajorityScorer()
    elif spec.kind == "orm":
        return RewardModelScorer(spec.path)
    elif spec.kind == "prm":
        return AggregatedScorer(RewardModelScorer(spec.path), spec.agg)
    elif spec.kind == "conf":
        from posttrain.search.confidence import ConfScorer

        return AggregatedScorer(ConfScorer(spec.path), spec.agg)
    elif _model_kind(spec.path, "scorer") == "critic":
        return CriticScorer(spec.path)
    else:
        return RewardModelScorer(spec.path)  # value: the probability at the last step end
    scorer.oracle = True
    return scorer


def is_oracle(scorer: Any) -> bool:
    """Whether a scorer object knows the ground truth (built from ``verifier`` / ``oracle_prm``)."""
    return bool(getattr(scorer, "oracle", False))
