"""A confidence PRM: step scores from the frozen policy's own token log-probs (``conf:PATH``).

Why: a PRM fine-tuned from the policy's backbone on Monte-Carlo labels learns which questions the
policy fails (its pooled step AUC is high) but ranks two chains of one question barely above chance;
the policy's own likelihood ranks them far better (measured in bench/search_learned.py). This
scorer keeps that signal: the policy is frozen and every step k of a chain gets features
``x_k = (mean token log-prob, min token log-prob, mean entropy, max entropy)`` over the step's
tokens (the step text and its end token: the separator, or ``</think>`` for the last step), and
a linear head ``p_k = sigmoid(w . (x_k - mu) / sd + b)`` trained by `posttrain.train.prm_conf`
(step BCE on MC labels and/or a within-question pair loss on chain outcomes).

Saved layout (``final/``): ``conf_head.json`` (format, features, mu, sd, w, b, separators) and a
copy of the policy folder it reads (model + tokenizer files), so the folder is self-contained.
`ConfScorer` is a search `Scorer`; ``conf:PATH`` / ``conf:AGG:PATH`` in
`posttrain.search.scorer_specs` select it for best-of-N, beam, MCTS and compute-optimal search.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ModelError

CONF_HEAD = "conf_head.json"
CONF_FORMAT = "posttrain-conf-head/1"
FEATURES = ("mean_logp", "min_logp", "mean_entropy", "max_entropy")


def step_features(
    token_logp: torch.Tensor, entropy: torch.Tensor, ends: list[int], start: int
) -> torch.Tensor:
    """(S, 4) features of the S steps of one chain.

    token_logp, entropy: (T,) the policy's log-prob of token t and the entropy of its predictive
    distribution at t; step k spans tokens ``ends[k-1] + 1 .. ends[k]`` (the first from
    ``start``, the response's first token), its end token included. Columns follow `FEATURES`.
    """
    rows, prev = [], start - 1
    for end in ends:
        lp, ent = token_logp[prev + 1 : end + 1], entropy[prev + 1 : end + 1]
        rows.append(torch.stack([lp.mean(), lp.min(), ent.mean(), ent.max()]))
        prev = end
    return torch.stack(rows) if rows else torch.zeros(0, len(FEATURES))


def step_ends(ids: torch.Tensor, start: int, length: int, sep_id: int, end_id: int | None) -> list[int]:
    """Token positions ending each step of one row (ids (T,)): every separator from ``start`` on
    before the first ``end_id``, and that ``end_id``; a path with no ``end_id`` yet (still being
    searched) also ends a non-empty trailing step at its last token (``length - 1``)."""
    from posttrain.models.heads import step_end_mask

    mask = step_end_mask(ids[None, :length], torch.tensor([start]), sep_id, end_id)[0]
    ends = mask.nonzero()[:, 0].tolist()
    finished = end_id is not None and bool((ids[start:length] == end_id).any())
    if not finished and length - 1 >= start and (not ends or ends[-1] < length - 1):
        ends.append(length - 1)
    return ends


@torch.no_grad()
def policy_step_features(
    model: Any, tokenizer: Any, prompts: list, texts: list[str], sep: str, last_end: str, batch_size: int = 32
) -> list[torch.Tensor]:
    """The (S_i, 4) `step_features` of each ``prompts[i]`` (messages) + ``texts[i]`` (the response
    as written, ``<think>s1<sep>s2...</think>...``) under the frozen policy ``model``."""
    from posttrain.data.collate import IGNORE_INDEX, pad_collate
    from posttrain.data.render import Sample, render_prompt_completion
    from posttrain.models.heads import single_token_id
    from posttrain.train.lm_loss import token_logprobs

    sep_id = single_token_id(tokenizer, sep, "step_sep")
    end_id = single_token_id(tokenizer, last_end, "last_step_end") if last_end else None
    device = next(model.parameters()).device
    closing = set(tokenizer.all_special_ids) - {sep_id, end_id}
    out: list[torch.Tensor] = []
    for k in range(0, len(texts), batch_size):
        samples = [
            render_prompt_completion(tokenizer, p, t)
            for p, t in zip(prompts[k : k + batch_size], texts[k : k + batch_size], strict=True)
        ]
        starts = [
            next((i for i, y in enumerate(s.labels) if y != IGNORE_INDEX), len(s.labels)) for s in samples
        ]
        scored = [  # the response's tokens: only they reach the LM head, a chunk at a time
            Sample(s.input_ids, [IGNORE_INDEX] * start + s.input_ids[start:])
            for s, start in zip(samples, starts, strict=True)
        ]
        batch = {k: v.to(device) for k, v in pad_collate(scored, tokenizer.pad_token_id).items()}
        logp, ent, _ = token_logprobs(model, batch, with_entropy=True, entropy_grad=False)
        ids, labelled = batch["input_ids"], batch["labels"][:, 1:] != IGNORE_INDEX
        token, entropy = torch.zeros(ids.shape, device=device), torch.zeros(ids.shape, device=device)
        token[:, 1:][labelled], entropy[:, 1:][labelled] = logp.float(), ent.float()
        for row, (s, start) in enumerate(zip(samples, starts, strict=True)):
            stop = len(s.input_ids)  # the template's end-of-turn tokens are not part of the path
            while stop > start and s.input_ids[stop - 1] in closing:
                stop -= 1
            ends = step_ends(ids[row].cpu(), start, stop, sep_id, end_id)
            out.append(step_features(token[row].cpu(), entropy[row].cpu(), ends, start))
    return out


@dataclass
class ConfHead:
    """``p = sigmoid(w . (x - mu) / sd + b)`` over the `FEATURES` of a step."""

    w: list[float]
    b: float
    mu: list[float]
    sd: list[float]
    features: tuple[str, ...] = FEATURES

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(S, 4) `step_features` (all `FEATURES` columns) -> (S,) logits over the head's features."""
        mu, sd, w = (torch.tensor(v, dtype=torch.float32) for v in (self.mu, self.sd, self.w))
        return ((select_features(x, self.features).float() - mu) / sd) @ w + self.b


def select_features(x: torch.Tensor, names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """The columns of (S, 4) `step_features` named by ``names`` (a subset of `FEATURES`)."""
    from posttrain.errors import ConfigError

    unknown = [n for n in names if n not in FEATURES]
    if unknown or not names:
        raise ConfigError(f"unknown confidence features {unknown or names}", where="features",
                          fix=f"choose one or more of {', '.join(FEATURES)}")  # fmt: skip
    return x[:, [FEATURES.index(n) for n in names]]


def save_conf(head: ConfHead, policy: str | Path, out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write ``conf_head.json`` and copy the policy's top-level files (model, tokenizer) into
    ``out_dir``; the json is written last (temp + replace), so a folder with one is complete."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(policy).expanduser().iterdir():
        if f.is_file() and f.name != CONF_HEAD:
            shutil.copy2(f, out / f.name)
    meta = {"format": CONF_FORMAT, "kind": "conf", **asdict(head), **info}
    tmp = out / (CONF_HEAD + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / CONF_HEAD)
    return out


def load_conf(path: str | Path) -> tuple[ConfHead, dict[str, Any]]:
    """The head and the full ``conf_head.json`` of a folder written by `save_conf`."""
    cfg = Path(path).expanduser() / CONF_HEAD
    if not cfg.is_file():
        raise ModelError(
            f"no {CONF_HEAD} here, so this is not a confidence PRM folder",
            where=str(path),
            fix="point at the final/ folder written by `posttrain prm-conf`",
        )
    meta = json.loads(cfg.read_text())
    head = ConfHead(meta["w"], float(meta["b"]), meta["mu"], meta["sd"], tuple(meta["features"]))
    return head, meta


class ConfScorer:
    """A confidence PRM folder as a search `Scorer`: per-step P(correct) of each path.

    The path is read as the PRM reads it (the question from ``metadata["question"]`` rendered as
    a user turn, the path text as written); an unfinished trailing step is scored too.
    """

    def __init__(self, path: str, batch_size: int = 32, device: str = "auto"):
        from posttrain.models.load import load_model, load_tokenizer

        self.head, self.info = load_conf(path)
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, device=device, tokenizer=self.tokenizer).eval()
        self.batch_size = batch_size

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) + len(self.head.w) + 1

    def step_probs(self, prompts: list, texts: list[str]) -> list[list[float]]:
        """Per-step P(correct) of each (messages, response text)."""
        feats = policy_step_features(self.model, self.tokenizer, prompts, texts, self.info["step_sep"],
                                     self.info["last_step_end"], self.batch_size)  # fmt: skip
        return [torch.sigmoid(self.head.logits(x)).tolist() if len(x) else [] for x in feats]

    def score(self, requests: list) -> list[list[float]]:
        prompts = [
            [{"role": "user", "content": str(r.metadata.get("question") or r.prompt)}] for r in requests
        ]
        out = []
        for r, probs in zip(requests, self.step_probs(prompts, [r.text for r in requests]), strict=True):
            n = max(len(r.steps), 1)
            out.append([probs[min(i, len(probs) - 1)] for i in range(n)] if probs else [0.0] * n)
        return out
