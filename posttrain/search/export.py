"""Exporters: search results -> training records for SFT, PRMs, value models and preferences.

Every record passes `posttrain.data.records.validate_record` (kinds noted below). The user
turn is the query's ``metadata["question"]`` (else the raw prompt); an assistant text of
the form ``<think>r</think>\\nAnswer: x`` goes out as ``reasoning_content=r``,
``content="Answer: x"`` (as the task suite writes SFT data), anything else as ``content``.

- `export_sft` (chat): the chosen path of each result -- or every distinct finished path --
  whose outcome reaches ``min_reward`` (rejection sampling from search).
- `export_prm` (prompt, in the PRM trainer's stepwise form ``{"prompt", "completions":
  [step, ...], "labels": [...], "final": "Answer: x"}``; steps without think tags or
  separators): finished paths with one label per step: the value of the node that wrote
  the step (``source="value"``: MCTS Q, i.e. the rollout success rate under mean backup of
  rollout outcomes; ``"score"``: the evaluator's score), clamped to [0, 1], or 0/1 with
  ``hard_threshold``.
- `export_values` (prompt_completion + ``value`` / ``visits``): every visited or scored
  partial path with its value estimate: value-model targets.
- `export_preferences` (preference): sibling comparisons: at every node with two or more
  children, the best finished path under the best child (chosen) against the worst
  finished path under the worst child (rejected), when their outcomes differ by more
  than ``margin``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from posttrain.search.base import SearchResult
from posttrain.search.structures import Node, SearchGraph, text_steps

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def user_turn(graph: SearchGraph) -> list[dict[str, str]]:
    return [{"role": "user", "content": str(graph.meta.get("question") or graph.prompt)}]


def assistant_turn(text: str) -> list[dict[str, str]]:
    """One assistant message; a leading think block becomes ``reasoning_content``."""
    body = text.strip()
    if body.startswith(THINK_OPEN) and THINK_CLOSE in body:
        reasoning, content = body[len(THINK_OPEN) :].split(THINK_CLOSE, 1)
        if content.strip():
            return [{"role": "assistant", "reasoning_content": reasoning.strip(), "content": content.strip()}]
    return [{"role": "assistant", "content": body}]


def outcome(node: Node) -> float | None:
    """A finished node's outcome: its reward, else its score, else its backed-up value."""
    if node.reward is not None:
        return node.reward
    if node.score is not None:
        return node.score
    return node.value if node.visits else None


def _finished(graph: SearchGraph) -> list[Node]:
    return [n for n in graph.terminals() if n.kind != "lookahead" and graph.path_text(n).strip()]


def export_sft(
    results: Iterable[SearchResult], min_reward: float | None = 1.0, paths: Literal["best", "all"] = "best"
) -> list[dict[str, Any]]:
    """Chat records from finished paths whose outcome is at least ``min_reward`` (None = any)."""
    out, seen = [], set()
    for r in results:
        g = r.graph
        nodes = _finished(g) if paths == "all" else [g.node(r.best)] if r.best is not None else []
        for n in nodes:
            value, text = outcome(n), g.path_text(n)
            if not n.terminal or (min_reward is not None and (value is None or value < min_reward)):
                continue
            if (g.prompt, text) in seen:
                continue
            seen.add((g.prompt, text))
            out.append({"messages": user_turn(g) + assistant_turn(text), "source": f"search:{r.strategy}"})
    return out


def _clean(piece: str) -> tuple[str, str]:
    """A step without think tags, and any text after ``</think>`` (the final-answer line)."""
    piece = piece.removeprefix(THINK_OPEN)
    step, _, final = piece.partition(THINK_CLOSE)
    return step.strip(), final.strip()


def _step_labels(
    g: SearchGraph, leaf: Node, step_sep: str, source: str
) -> tuple[list[str], list[float], str]:
    steps, labels, final = [], [], ""
    for n in g.path(leaf):
        value = (n.q if n.visits else outcome(n)) if source == "value" else n.score
        for piece in text_steps(n.text, step_sep):
            step, tail = _clean(piece)
            final = tail or final
            if step:
                steps.append(step)
                labels.append(min(1.0, max(0.0, float(value if value is not None else 0.0))))
    return steps, labels, final


def export_prm(
    results: Iterable[SearchResult],
    step_sep: str = "<step>",
    source: Literal["value", "score"] = "value",
    hard_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Stepwise records (the PRM trainer's form) from every finished path (see the module docstring)."""
    out = []
    for r in results:
        g = r.graph
        for leaf in _finished(g):
            steps, labels, final = _step_labels(g, leaf, step_sep, source)
            if not steps:
                continue
            meta = {k: g.meta[k] for k in ("task", "level", "ground_truth") if k in g.meta}
            out.append({
                "prompt": user_turn(g),
                "completions": steps,
                "labels": [int(v >= hard_threshold) for v in labels] if hard_threshold is not None else labels,
                "final": final,
                "metadata": {**meta, "source": f"search:{r.strategy}:{source}"},
            })  # fmt: skip
    return out


def export_values(results: Iterable[SearchResult]) -> list[dict[str, Any]]:
    """Value-model targets: each visited or scored path prefix with its value."""
    out = []
    for r in results:
        g = r.graph
        for n in g.nodes[1:]:
            text = g.path_text(n)
            if not text.strip() or (not n.visits and n.score is None) or n.kind == "lookahead":
                continue
            out.append({
                "prompt": user_turn(g),
                "completion": [{"role": "assistant", "content": text}],
                "value": n.q,
                "visits": n.visits,
                "terminal": n.terminal,
                "source": f"search:{r.strategy}",
            })  # fmt: skip
    return out


def _below(g: SearchGraph, node: Node) -> list[Node]:
    """Finished nodes in the subtree of ``node`` (itself included) that have an outcome."""
    stack, found = [node], []
    while stack:
        cur = stack.pop()
        if cur.terminal and outcome(cur) is not None and cur.kind != "lookahead":
            found.append(cur)
        stack += [g.node(c) for c in cur.children]
    return found


def export_preferences(results: Iterable[SearchResult], margin: float = 0.0) -> list[dict[str, Any]]:
    """Preference pairs from sibling comparisons (see the module docstring)."""
    out, seen = [], set()
    for r in results:
        g = r.graph
        for parent in g.nodes:
            kids = [g.node(c) for c in parent.children if g.node(c).kind != "lookahead"]
            ranked = sorted(
                (k for k in kids if _below(g, k)), key=lambda k: k.q if k.visits else outcome(k) or 0.0
            )
            if len(ranked) < 2:
                continue
            good = max(_below(g, ranked[-1]), key=outcome)  # type: ignore[arg-type]
            bad = min(_below(g, ranked[0]), key=outcome)  # type: ignore[arg-type]
            chosen, rejected = g.path_text(good), g.path_text(bad)
            if (
                outcome(good) - outcome(bad) <= margin
                or chosen == rejected
                or (g.prompt, chosen, rejected) in seen
            ):  # type: ignore[operator]
                continue
            seen.add((g.prompt, chosen, rejected))
            out.append({
                "prompt": user_turn(g),
                "chosen": chosen.strip(),
                "rejected": rejected.strip(),
                "chosen_score": outcome(good),
                "rejected_score": outcome(bad),
                "source": f"search:{r.strategy}",
            })  # fmt: skip
    return out
