"""`posttrain prm-conf`: train a confidence PRM (`posttrain.search.confidence`) on MC step labels.

The policy stays frozen; each step of each labelled chain (``prm.jsonl`` of `posttrain prm-label`)
gets the policy's confidence features (mean / min token log-prob, mean / max entropy over the
step's tokens), and a linear head over them is fit full-batch with Adam on

    L = bce_weight * BCE(sigmoid(z_k), label_k)  (mean over steps)
      + pair_weight * mean over pairs (a right, b wrong chain of one question) of
        softplus(-(min_k z_a,k - min_k z_b,k))
      + l2 * |w|^2

(`chain_pair_loss`: Bradley-Terry on the chains' min-aggregated step logits, outcome labels
``metadata.correct``). Features are standardised with the training mean / sd. ``eval.json`` holds,
on the held-out records (e.g. ``oracle.jsonl``: true step labels), step AUC, first-error accuracy
and the same-question ``pair_acc`` of the trained head ("after") and of the raw step mean
log-prob with no head ("before", the untrained control). ``final/`` is a `conf:PATH` scorer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.errors import DataError
from posttrain.search.confidence import FEATURES


@dataclass
class PRMConfRecipe:
    """`posttrain prm-conf RECIPE.yaml`: every key of a confidence-PRM recipe."""

    policy: str = "runs/sft/final"
    """The frozen policy whose token log-probs are the features (the one that wrote the chains)."""
    train: str = "runs/prm_label/prm.jsonl"
    """Step-labelled chains {prompt, completions, labels, final, metadata.correct} (`prm-label`)."""
    eval: str | None = None
    """Held-out records in the same form (e.g. prm-label's oracle.jsonl on test questions); null = none."""
    step_sep: str = "<step>"
    """Token ending every step but the last (one token in the policy's tokenizer)."""
    last_step_end: str = "</think>"
    """Token ending the last step."""
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    """Which step features the head reads: mean_logp, min_logp, mean_entropy, max_entropy."""
    bce_weight: float = 1.0
    """Weight of the step BCE on the MC labels (pooled calibration: step AUC)."""
    pair_weight: float = 1.0
    """Weight of the within-question chain pair loss on outcomes (ranking a question's chains)."""
    l2: float = 1e-3
    """L2 penalty on the head's weights (standardised features)."""
    steps: int = 300
    """Full-batch Adam steps."""
    lr: float = 0.05
    """Adam learning rate."""
    batch_size: int = 32
    """Chains per policy forward when computing features."""
    output_dir: str = "runs/prm_conf"
    """Run directory: eval.json, final/ (conf_head.json + a copy of the policy)."""


def read_chains(path: str, where: str) -> list[dict]:
    """The records of a stepwise JSONL file; a DataError naming the line if a key is missing."""
    rows = []
    for n, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        missing = [k for k in ("prompt", "completions", "labels") if k not in r]
        if missing:
            raise DataError(f"{path}:{n}: record lacks {missing}", where=where,
                            fix="use the prm.jsonl / oracle.jsonl written by `posttrain prm-label`")  # fmt: skip
        rows.append(r)
    return rows


def chain_pair_loss(
    logits: torch.Tensor, chain: torch.Tensor, question: torch.Tensor, correct: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry between chains of one question, right over wrong, on min-aggregated scores.

    logits, chain: (N,) step logits and each step's chain index in [0, C); question, correct: (C,)
    each chain's question id and outcome. s_c = min over c's steps; loss = mean over pairs (a, b),
    same question, a right, b wrong, both with steps, of softplus(-(s_a - s_b)); pair_acc counts
    s_a > s_b (ties half). No pair: loss 0 (still differentiable), pair_acc 0, pairs 0.
    """
    from posttrain.algos.rm_losses import grouped_pair_loss

    c = question.numel()
    big = torch.finfo(logits.dtype).max
    s = torch.full((c,), big, dtype=logits.dtype, device=logits.device).scatter_reduce(
        0, chain, logits, "amin"
    )
    has = torch.zeros(c, dtype=torch.bool, device=logits.device).index_fill(0, chain, True)
    # the chains' min scores as one group per question, outcome as the label: right-over-wrong pairs
    loss, m = grouped_pair_loss(s[has], correct[has].to(logits.dtype), question[has])
    return loss, {"pair_acc": m["pair_acc"].detach(), "pairs": m["pairs"]}


def stack_chains(feats: list[torch.Tensor], rows: list[dict]) -> dict[str, torch.Tensor]:
    """Flatten chains whose feature count equals their label count: x (N, F), labels (N,),
    chain (N,), question (C,), correct (C,) over the kept chains."""
    keep = [i for i, r in enumerate(rows) if len(feats[i]) == len(r["labels"]) and len(r["labels"])]
    qid: dict[str, int] = {}
    question = [qid.setdefault(json.dumps(rows[i]["prompt"], sort_keys=True), len(qid)) for i in keep]
    return {
        "x": torch.cat([feats[i] for i in keep]) if keep else torch.zeros(0, 4),
        "labels": torch.tensor([float(v) for i in keep for v in rows[i]["labels"]]),
        "chain": torch.tensor([c for c, i in enumerate(keep) for _ in rows[i]["labels"]], dtype=torch.long),
        "question": torch.tensor(question, dtype=torch.long),
        "correct": torch.tensor([bool(rows[i].get("metadata", {}).get("correct", False)) for i in keep]),
    }


def fit_conf_head(data: dict[str, torch.Tensor], features: list[str], bce_weight: float, pair_weight: float,
                  l2: float, steps: int, lr: float):  # fmt: skip
    """The `ConfHead` over ``features`` minimising the module's loss on `stack_chains` data (zero
    init, full batch)."""
    from posttrain.search.confidence import ConfHead, select_features

    x = select_features(data["x"], features).float()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    xn = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        z = xn @ w + b
        loss = l2 * (w**2).sum()
        if bce_weight:
            loss = loss + bce_weight * torch.nn.functional.binary_cross_entropy_with_logits(z, data["labels"])
        if pair_weight:
            loss = (
                loss + pair_weight * chain_pair_loss(z, data["chain"], data["question"], data["correct"])[0]
            )
        loss.backward()
        opt.step()
    return ConfHead(w.detach().tolist(), float(b.detach()), mu.tolist(), sd.tolist(), tuple(features))


def conf_metrics(logits: torch.Tensor, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Step AUC / accuracy / first-error accuracy (vs the records' labels) and same-question pair_acc."""
    from posttrain.algos.rm_losses import step_metrics

    out = {k: float(v) for k, v in step_metrics(torch.sigmoid(logits), data["labels"], data["chain"]).items()}
    _, pm = chain_pair_loss(logits, data["chain"], data["question"], data["correct"])
    return out | {"pair_acc": float(pm["pair_acc"]), "pairs": int(pm["pairs"])}


def run_prm_conf(cfg: PRMConfRecipe) -> Path:
    """Compute features, fit the head, evaluate, export; returns ``final/``. A finished run
    (``final/conf_head.json`` and ``eval.json``) is returned as is."""
    from posttrain.models.heads import prm_response
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.search.confidence import policy_step_features, save_conf

    out, final = Path(cfg.output_dir), Path(cfg.output_dir) / "final"
    if (final / "conf_head.json").is_file() and (out / "eval.json").is_file():
        return final
    tok = load_tokenizer(cfg.policy)
    model = load_model(cfg.policy, tokenizer=tok).eval()

    def load(path: str, key: str) -> dict[str, torch.Tensor]:
        rows = read_chains(path, key)
        texts = [
            prm_response(r["completions"], cfg.step_sep, cfg.last_step_end, r.get("final", "")) for r in rows
        ]
        feats = policy_step_features(model, tok, [r["prompt"] for r in rows], texts, cfg.step_sep,
                                     cfg.last_step_end, cfg.batch_size)  # fmt: skip
        return stack_chains(feats, rows)

    train = load(cfg.train, "train")
    if not len(train["labels"]):
        raise DataError(f"{cfg.train}: no chain with labelled steps", where="train",
                        fix="label chains with `posttrain prm-label` (its prm.jsonl)")  # fmt: skip
    head = fit_conf_head(train, cfg.features, cfg.bce_weight, cfg.pair_weight, cfg.l2, cfg.steps, cfg.lr)
    report = {"train": conf_metrics(head.logits(train["x"]), train), "n_train_steps": len(train["labels"])}
    if cfg.eval:
        held = load(cfg.eval, "eval")
        report |= {"after": conf_metrics(head.logits(held["x"]), held),
                   "before": conf_metrics(held["x"][:, 0], held)}  # fmt: skip  # raw step mean log-prob
    save_conf(head, cfg.policy, final, {"step_sep": cfg.step_sep, "last_step_end": cfg.last_step_end})
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "eval.json")
    return final


def prm_conf_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """`posttrain prm-conf RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe

    final = run_prm_conf(load_recipe(PRMConfRecipe, recipe_path, overrides))
    print(f"confidence PRM: {final} (scorer conf:{final})")
    return final
