"""What every strategy shares: the common config fields, the result record, small helpers.

A strategy is a function ``fn(policy, queries, cfg, scorer) -> list[SearchResult]`` that
builds one `SearchGraph` per query and advances all of them in lockstep, so each round
makes one policy call (and at most one scorer call) for every prompt together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from posttrain.errors import ConfigError
from posttrain.rollout.sampling import SamplingParams
from posttrain.search.budget import Budget, Cost, param_count
from posttrain.search.operators_tree import vote
from posttrain.search.protocols import Query
from posttrain.search.structures import Node, SearchGraph, StepConfig, StructureKind

FinalRule = Literal["score", "weighted_majority", "majority"]


@dataclass
class SearchConfig:
    """Fields shared by every strategy config."""

    temperature: float = 0.7
    """Sampling temperature of expansions (diversity of siblings); 0 = greedy."""
    top_p: float = 1.0
    """Nucleus mass of expansions."""
    top_k: int = 0
    """Top-k of expansions; 0 disables it."""
    seed: int | None = None
    """Sampling seed passed to the policy."""
    step: StepConfig = field(default_factory=StepConfig)
    """Step granularity, separator and length caps (greedy, best_of_n, self_consistency, got and
    self_refine always generate whole chains)."""
    budget: Budget = field(default_factory=Budget)
    """Hard per-prompt limits, enforced inside the search."""

    def sampling(self, temperature: float | None = None) -> SamplingParams:
        t = self.temperature if temperature is None else temperature
        return SamplingParams(
            temperature=t, top_p=self.top_p, top_k=self.top_k, seed=self.seed, source="search"
        )

    def uses_scorer(self) -> bool:
        """Whether this configuration needs a scorer (beyond the strategy's registration)."""
        return False

    def check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", where=name)


@dataclass
class SearchResult:
    """One prompt's search: the structure (with trace and cost), the chosen node and answer."""

    strategy: str
    graph: SearchGraph
    best: int | None
    answer: str | None
    text: str
    outcome: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def cost(self) -> Cost:
        return self.graph.cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "best": self.best,
            "answer": self.answer,
            "text": self.text,
            "outcome": self.outcome,
            "config": self.config,
            "graph": self.graph.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchResult:
        graph = SearchGraph.from_dict(d["graph"])
        graph.cost = Cost.from_dict(graph.cost)
        return cls(d["strategy"], graph, d.get("best"), d.get("answer"), d.get("text", ""),
                   dict(d.get("outcome") or {}), dict(d.get("config") or {}))  # fmt: skip


def make_graphs(queries: Sequence[Query | str], kind: StructureKind = "tree") -> list[SearchGraph]:
    """One empty structure per query, with a zero `Cost`."""
    graphs = []
    for q in queries:
        q = Query(q) if isinstance(q, str) else q
        graphs.append(SearchGraph(prompt=q.prompt, kind=kind, meta=dict(q.metadata), cost=Cost()))
    return graphs


def extract(text: str) -> str | None:
    """The final answer of a path (the project's ``Answer: x`` format)."""
    from posttrain.data.tasks import extract_answer

    return extract_answer(text)


def choose(graph: SearchGraph, nodes: Sequence[Node], rule: FinalRule = "score") -> tuple[Node | None, dict]:
    """The final node among ``nodes``: best score, or (weighted) majority over answers.

    For majority rules the chosen node is the best-scored one carrying the winning answer.
    """
    if not nodes:
        return None, {}
    ranked = sorted(nodes, key=lambda n: -1e30 if n.score is None else n.score, reverse=True)
    if rule == "score":
        return ranked[0], {}
    answers = [extract(graph.path_text(n)) for n in ranked]
    weights = None if rule == "majority" else [max(n.score or 0.0, 0.0) for n in ranked]
    winner, totals = vote(answers, weights)
    graph.record("aggregate", [n.id for n in ranked], [], rule=rule, votes=totals, winner=winner)
    if winner is None:
        return ranked[0], {"votes": totals}
    return next(n for n, a in zip(ranked, answers, strict=True) if a == winner), {"votes": totals}


def finish(
    strategy: str, graph: SearchGraph, node: Node | None, cfg: SearchConfig, **outcome: Any
) -> SearchResult:
    """The `SearchResult` for ``graph`` with ``node`` chosen (None = nothing finished)."""
    text = graph.path_text(node) if node is not None else ""
    graph.record("finish", [], [node.id] if node is not None else [], strategy=strategy)
    return SearchResult(strategy, graph, node.id if node is not None else None, extract(text) if text else None,
                        text, dict(outcome), asdict(cfg))  # fmt: skip


def live(graphs: Sequence[SearchGraph], cfg: SearchConfig, policy: Any) -> list[SearchGraph]:
    """The graphs whose budget still allows a policy call."""
    pp = param_count(policy)
    return [g for g in graphs if not cfg.budget.exhausted(g.cost, pp)]


def need_scorer(scorer: Any, strategy: str, why: str) -> None:
    if scorer is None:
        raise ConfigError(
            f"strategy {strategy!r} needs a scorer ({why})",
            where="search.scorer",
            fix="pass a PRM/value model, a verifier (posttrain.search.scorers.task_verifier()) or a judge",
        )


def queries_from_problems(problems: Sequence[Any], tokenizer: Any = None) -> list[Query]:
    """Queries for task-suite `Problem`s, with the metadata verifiers and exporters read.

    Without a tokenizer the prompt is ``question + "\\n"`` (the pretraining format the
    default model continues with ``<think>``); with one, the chat template's generation prompt.
    """
    out = []
    for p in problems:
        messages = p.prompt_record()["prompt"]
        prompt = (
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if tokenizer is not None
            else p.question + "\n"
        )
        meta = {"question": p.question, "ground_truth": p.answer, "task": p.task, "level": p.level}
        out.append(Query(prompt, meta))
    return out
