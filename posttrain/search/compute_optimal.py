"""Compute-optimal test-time scaling (Snell et al. 2024): spend search compute by estimated difficulty.

For every prompt, in three phases (all prompts batched together):

1. Probe: ``probe_n`` whole chains at ``temperature`` (ONE policy call), scored by the scorer
   (ONE call) when the difficulty rule or ``probe_select`` reads scores.
2. Difficulty ``d`` in [0, 1] from the probe, with a_i the extracted answers and s_i the
   scores clamped to [0, 1]:

   - ``agreement``: ``d = 1 - max_a #{i : a_i = a} / probe_n`` (an unanswered sample agrees
     with nothing, so a prompt the model never answers is the hardest);
   - ``score``: ``d = 1 - mean_i s_i``; with the true verifier this is one minus the probe's
     pass rate (the paper's oracle difficulty), with a PRM / ORM its model-predicted difficulty;
   - ``mean``: the mean of both.

   The bin is ``b = #{e in edges : e <= d}``: bin 0 holds the easiest prompts.
3. Each bin's plan (`BinPlan`: a registered strategy, its config and budget) runs on that bin's
   prompts (ONE `run_search` per bin). The plan ``probe`` spends nothing more: it answers from
   the probe samples by ``probe_select``. A search that finishes without an answer falls back
   to the probe's.

The paper's finding, which the default table follows: easy prompts gain most from cheap
sequential work (here: the probe's own majority), hard ones from parallel sampling or tree
search with more budget. Deviation: the paper bins by quantiles of difficulty over the test
set; fixed ``edges`` keep each prompt's plan independent of the others in its batch.

Cost is counted honestly: a result's ``cost`` is the probe's (generated, prompt and scored
tokens, calls, FLOPs) plus its bin search's. The probe structure stays nested in the result
(``graph.root.inner``; the result's graph itself for the ``probe`` plan) and a ``probe`` event
opens the trace. ``budget`` is a hard limit on probe and search together: a bin's search runs
under the tighter of its own budget and what the costliest probe in the bin left of ``budget``
(so no prompt crosses it).

The table is written by hand or fitted on a labelled calibration split by `calibrate`, which
keeps per bin the most accurate candidate plan whose mean tokens (probe included) fit a
budget (`choose_plans`). A plan inherits ``step`` and, offset per bin, ``seed`` (the same seed
would redraw the probe's samples).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from posttrain.errors import ConfigError
from posttrain.search.base import FinalRule, SearchConfig, SearchResult, choose, extract, finish
from posttrain.search.budget import Cost, remaining, tighter
from posttrain.search.operators import Aggregation, evaluate
from posttrain.search.operators_tree import vote
from posttrain.search.protocols import PolicyLike, Query, Scorer
from posttrain.search.registry import (
    build_config,
    get_strategy,
    register_strategy,
    requires_scorer,
    run_search,
)
from posttrain.search.sampling_strategies import sample_chains
from posttrain.search.structures import Node, SearchGraph, TraceEvent

DifficultyRule = Literal["agreement", "score", "mean"]
PROBE = "probe"


@dataclass
class BinPlan:
    """What one difficulty bin gets: a strategy (or ``probe``), its config and budget."""

    strategy: str = PROBE
    """A registered strategy name, or ``probe``: answer from the probe samples, spend nothing more."""
    config: dict[str, Any] = field(default_factory=dict)
    """The strategy's config keys (``budget`` included); ``step`` and ``seed`` default to the
    compute_optimal config's (a plan's own ``step`` replaces the whole section)."""

    def describe(self) -> str:
        """A short label, e.g. ``best_of_n(n=16, select=verifier)``."""
        keys = ", ".join(f"{k}={v}" for k, v in self.config.items() if not isinstance(v, dict))
        return f"{self.strategy}({keys})" if keys else self.strategy


def default_bins() -> list[BinPlan]:
    """Easy: the probe's majority; medium: 8 more votes; hard: best-of-16 by the scorer's weighted vote."""
    return [
        BinPlan(PROBE),
        BinPlan("self_consistency", {"n": 8}),
        BinPlan("best_of_n", {"n": 16, "select": "weighted_majority"}),
    ]


@dataclass
class ComputeOptimalConfig(SearchConfig):
    """Compute-optimal allocation: probe, estimate difficulty, run each bin's plan."""

    probe_n: int = 4
    """Chains sampled per prompt to estimate its difficulty (at ``temperature``)."""
    difficulty: DifficultyRule = "agreement"
    """Difficulty from answer agreement, the scorer's scores, or their mean (module docstring)."""
    how: Aggregation = "last"
    """How a probe chain's step scores become its score (``last`` suits verifiers, ORMs and the
    PRM's final-step score; ``min`` is a PRM's weakest step)."""
    edges: list[float] = field(default_factory=lambda: [0.3, 0.6])
    """Ascending difficulty thresholds: ``len(edges) + 1`` bins, bin 0 the easiest."""
    bins: list[BinPlan] = field(default_factory=default_bins)
    """One plan per bin, easiest first."""
    probe_select: FinalRule = "majority"
    """How the ``probe`` plan (and the fallback) picks among the probe chains."""

    def __post_init__(self) -> None:
        self.check_positive("probe_n")
        if any(not 0.0 <= e <= 1.0 for e in self.edges) or sorted(set(self.edges)) != list(self.edges):
            raise ConfigError(f"edges must be strictly ascending in [0, 1], got {self.edges}", where="edges")
        if len(self.bins) != len(self.edges) + 1:
            raise ConfigError(
                f"{len(self.edges)} edges make {len(self.edges) + 1} bins, but {len(self.bins)} plans are given",
                where="bins",
                fix="give one plan per bin (easiest first), or change edges",
            )
        for i, plan in enumerate(self.bins):
            plan_config(plan, self, f"bins[{i}]", i)  # unknown strategies and keys fail now

    def probe_scored(self) -> bool:
        """Whether the probe chains are scored (the difficulty rule or ``probe_select`` reads scores)."""
        return self.difficulty != "agreement" or self.probe_select != "majority"

    def uses_scorer(self) -> bool:
        return self.probe_scored() or any(plan_needs_scorer(p, self) for p in self.bins)


def plan_config(plan: BinPlan, cfg: ComputeOptimalConfig, where: str = "bins", index: int = 0) -> Any:
    """The plan's strategy config (None for ``probe``); ``step`` inherited from ``cfg``, and the
    seed ``cfg.seed + 1 + index`` (so bin ``index`` does not redraw the probe's samples)."""
    if plan.strategy == PROBE:
        if plan.config:
            raise ConfigError("the probe plan takes no config", where=f"{where}.config")
        return None
    if plan.strategy == "compute_optimal":
        raise ConfigError("compute_optimal cannot be a bin's plan", where=f"{where}.strategy")
    try:
        strategy = get_strategy(plan.strategy)
    except ConfigError as exc:
        raise ConfigError(exc.message, where=f"{where}.strategy", fix=exc.fix) from None
    seed = None if cfg.seed is None else cfg.seed + 1 + index
    raw = {"step": asdict(cfg.step), "seed": seed, **plan.config}
    try:
        return build_config(strategy, raw)
    except ConfigError as exc:
        raise ConfigError(f"{plan.strategy}: {exc.message}", where=f"{where}.config", fix=exc.fix) from None


def plan_needs_scorer(plan: BinPlan, cfg: ComputeOptimalConfig) -> bool:
    if plan.strategy == PROBE:
        return False
    return requires_scorer(get_strategy(plan.strategy), plan_config(plan, cfg))


def agreement(answers: Sequence[str | None]) -> float:
    """Share of samples carrying the most common answer (None answers agree with nothing)."""
    if not answers:
        return 0.0
    _, totals = vote(answers)
    return max(totals.values(), default=0.0) / len(answers)


def difficulty(answers: Sequence[str | None], scores: Sequence[float | None], rule: DifficultyRule) -> float:
    """A prompt's difficulty in [0, 1] from its probe samples (module docstring, phase 2)."""
    by_agreement = 1.0 - agreement(answers)
    if rule == "agreement":
        return by_agreement
    known = [min(1.0, max(0.0, s)) for s in scores if s is not None]
    by_score = 1.0 - sum(known) / len(known) if known else 1.0
    return by_score if rule == "score" else (by_agreement + by_score) / 2


def bin_of(d: float, edges: Sequence[float]) -> int:
    """The bin of difficulty ``d``: the number of edges at or below it."""
    return bisect.bisect_right(list(edges), d)


def _probe(policy, queries, cfg: ComputeOptimalConfig, scorer) -> tuple[list[SearchGraph], list[list[Node]]]:
    graphs, chains = sample_chains(policy, queries, cfg, cfg.probe_n)
    if scorer is not None and cfg.probe_scored():
        targets = [(g, c) for g, cs in zip(graphs, chains, strict=True) for c in cs]
        evaluate(scorer, targets, cfg.how, cfg.step.step_sep, cfg.budget)
        for _, c in targets:
            c.reward = c.score  # a whole chain is terminal: its score is its outcome
    for g, cs in zip(graphs, chains, strict=True):
        answers = [extract(g.path_text(c)) for c in cs]
        d = difficulty(answers, [c.score for c in cs], cfg.difficulty)
        b = bin_of(d, cfg.edges)
        g.record("probe", [0], [c.id for c in cs], difficulty=d, bin=b, answers=answers,
                 plan=cfg.bins[b].describe())  # fmt: skip
    return graphs, chains


def _probe_info(g: SearchGraph) -> dict[str, Any]:
    event = next(e for e in reversed(g.trace) if e.op == "probe")
    return {"difficulty": event.info["difficulty"], "bin": event.info["bin"], "plan": event.info["plan"]}


def _answer_from_probe(g: SearchGraph, chains: list[Node], cfg: ComputeOptimalConfig) -> SearchResult:
    node, info = choose(g, chains, cfg.probe_select)
    return finish("compute_optimal", g, node, cfg, **_probe_info(g), probe_cost=g.cost.to_dict(), **info)


def _merge(result: SearchResult, probe: SearchGraph, chains, cfg: ComputeOptimalConfig) -> SearchResult:
    """The bin search's result with the probe nested in its root and the probe's cost added."""
    graph = result.graph
    graph.root.inner = probe
    graph.cost = probe.cost.add(graph.cost)
    info = _probe_info(probe)
    graph.trace.insert(
        0, TraceEvent("probe", 0, [0], [], {**info, "nested": True, "cost": probe.cost.to_dict()})
    )
    outcome = {**result.outcome, **info, "probe_cost": probe.cost.to_dict(), "search": result.strategy}
    merged = dataclasses.replace(result, strategy="compute_optimal", outcome=outcome,
                                 config={**asdict(cfg), "plan_config": result.config})  # fmt: skip
    if merged.answer is None and chains:
        fallback, _ = choose(probe, chains, cfg.probe_select)
        merged.text = probe.path_text(fallback) if fallback is not None else ""
        merged.answer = extract(merged.text) if merged.text else None
        merged.outcome["fallback"] = PROBE
    return merged


def allocate(policy, queries, graphs, chains, cfg: ComputeOptimalConfig, scorer) -> list[SearchResult]:
    """Phase 3: each bin's plan on its prompts, given the probed ``graphs`` and ``chains``."""
    out: list[SearchResult | None] = [None] * len(graphs)
    for b, plan in enumerate(cfg.bins):
        idx = [i for i, g in enumerate(graphs) if _probe_info(g)["bin"] == b]
        if not idx:
            continue
        if plan.strategy == PROBE:
            for i in idx:
                out[i] = _answer_from_probe(graphs[i], chains[i], cfg)
            continue
        sub = plan_config(plan, cfg, f"bins[{b}]", b)
        sub.budget = tighter(sub.budget, *(remaining(cfg.budget, graphs[i].cost) for i in idx))
        got = run_search(plan.strategy, policy, [queries[i] for i in idx], scorer, sub)
        for i, r in zip(idx, got, strict=True):
            out[i] = _merge(r, graphs[i], chains[i], cfg)
    return [r for r in out if r is not None]


@register_strategy("compute_optimal", ComputeOptimalConfig)
def compute_optimal(
    policy: PolicyLike,
    queries: Sequence[Query | str],
    cfg: ComputeOptimalConfig,
    scorer: Scorer | None = None,
) -> list[SearchResult]:
    """Probe, bin by difficulty, run each bin's plan (see the module docstring)."""
    graphs, chains = _probe(policy, queries, cfg, scorer)
    return allocate(policy, queries, graphs, chains, cfg, scorer)


def choose_plans(table: Sequence[Sequence[tuple[float, float]]], max_tokens: float | None) -> list[int]:
    """Per bin, the index of the candidate to use.

    ``table[b][k] = (accuracy, mean tokens per prompt)`` of candidate k on bin b. The choice is
    the most accurate candidate whose tokens fit ``max_tokens`` (None = no limit), the
    cheaper one on ties; when none fits, the cheapest.
    """
    out = []
    for row in table:
        fits = [k for k, (_, t) in enumerate(row) if max_tokens is None or t <= max_tokens]
        if fits:
            out.append(max(fits, key=lambda k: (row[k][0], -row[k][1])))
        else:
            out.append(min(range(len(row)), key=lambda k: row[k][1]))
    return out


def calibrate(
    policy: PolicyLike,
    queries: Sequence[Query | str],
    cfg: ComputeOptimalConfig,
    candidates: Sequence[BinPlan],
    grade: Callable[[SearchResult], bool],
    scorer: Scorer | None = None,
    max_tokens: float | None = None,
) -> tuple[ComputeOptimalConfig, list[list[tuple[float, float]]]]:
    """Fit ``cfg.bins`` on a labelled calibration split; returns the fitted config and the table.

    The calibration prompts are probed once; then each candidate runs as the plan of every bin
    on a copy of the probes, so all candidates see the same bins and pay the same probe (its
    tokens count: they are what a prompt really spends). ``grade(result)`` says whether a
    result is right (e.g. the true verifier). Per bin `choose_plans` keeps the best candidate
    at ``max_tokens`` generated tokens per prompt; a bin without calibration prompts keeps its plan.
    """
    if not candidates:
        raise ConfigError("calibration needs at least one candidate plan", where="calibration.candidates")
    n_bins = len(cfg.edges) + 1
    probed = _probe(policy, queries, cfg, scorer)
    counts = Counter(_probe_info(g)["bin"] for g in probed[0])
    table: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for plan in candidates:
        graphs, chains = copy.deepcopy(probed)
        results = allocate(
            policy, queries, graphs, chains, dataclasses.replace(cfg, bins=[plan] * n_bins), scorer
        )
        for b in range(n_bins):
            mine = [r for r in results if r.outcome["bin"] == b]
            acc = sum(bool(grade(r)) for r in mine) / len(mine) if mine else 0.0
            tokens = sum(r.cost.generated_tokens for r in mine) / len(mine) if mine else 0.0
            table[b].append((acc, tokens))
    picks = choose_plans(table, max_tokens)
    bins = [candidates[k] if counts[b] else cfg.bins[b] for b, k in enumerate(picks)]
    return dataclasses.replace(cfg, bins=bins), table


def total_probe_cost(results: Sequence[SearchResult]) -> Cost:
    """What the probes of ``results`` spent (part of their costs)."""
    out = Cost()
    for r in results:
        out = out.add(Cost.from_dict(r.outcome.get("probe_cost")))
    return out
