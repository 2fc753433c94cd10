"""Reasoning structures: nodes and the chain / tree / graph / nested structures built from them.

A `SearchGraph` holds one prompt's search: node 0 is the root (the prompt), every other
node is one reasoning step (or a whole chain, at chain granularity). A node knows its
parents (one in a tree or chain, several in a graph after Aggregate), its children, its
visit count and backed-up value (MCTS), the score an Evaluate operator gave its path, an
optional outcome reward, the policy prior used by PUCT, and whether it is terminal. A
nested structure is a node whose ``inner`` holds a whole chain (LLaMA-Berry style).

Path text: the concatenation of the step texts from the root, or from the nearest
``standalone`` ancestor (a node created by Refine/Aggregate/Restructure that holds a whole
chain by itself). Step texts are kept exactly as generated, separator included, so the
path text is what the policy continues.

Every operator applied to a graph is appended to ``graph.trace`` (trace-based supervision);
the graph, its trace and its cost round-trip through `to_dict` / `from_dict`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from posttrain.errors import ConfigError, DataError

Granularity = Literal["token", "step", "chain"]
StructureKind = Literal["chain", "tree", "graph"]
NODE_KINDS = ("root", "step", "rollout", "lookahead", "refined", "aggregate", "insights")


@dataclass
class StepConfig:
    """What one node of the structure is (the step granularity) and how deep a search may go."""

    granularity: Granularity = "step"
    """`token`: a fixed number of tokens per node; `step`: text up to the step separator;
    `chain`: a whole completion per node."""
    step_sep: str = "<step>"
    """Step separator: the tokenizer's step token (the default model writes `<step>`) or any
    stop string such as a newline."""
    tokens_per_step: int = 16
    """Tokens per node at `token` granularity."""
    max_step_tokens: int = 64
    """Token cap of one step at `step` granularity; a step that hits it ends its path."""
    max_new_tokens: int = 256
    """Token cap of one node at `chain` granularity (a whole completion or rollout)."""
    max_depth: int = 12
    """Steps from the root after which a path is forced terminal."""
    continue_with_ids: bool = True
    """Continue paths from token ids (exact, no re-tokenisation) when the policy returned them."""

    def __post_init__(self) -> None:
        if self.granularity == "step" and not self.step_sep:
            raise ConfigError(
                "step granularity needs a step separator", where="step.step_sep", fix="e.g. '<step>' or '\\n'"
            )
        for key in ("tokens_per_step", "max_step_tokens", "max_new_tokens", "max_depth"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1", where=f"step.{key}")


@dataclass
class TraceEvent:
    """One operator application: its name, the round, the node ids it read and wrote, details."""

    op: str
    round: int
    inputs: list[int]
    outputs: list[int]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Node:
    """One reasoning step (or chain) in a structure; see the module docstring."""

    id: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    depth: int = 0
    parents: list[int] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    kind: str = "step"
    visits: int = 0
    value: float = 0.0
    score: float | None = None
    step_scores: list[float] = field(default_factory=list)
    reward: float | None = None
    prior: float = 1.0
    logprob: float = 0.0
    terminal: bool = False
    pruned: bool = False
    standalone: bool = False
    finish_reason: str = ""
    inner: SearchGraph | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def parent(self) -> int | None:
        """The first parent (the tree parent), or None for the root."""
        return self.parents[0] if self.parents else None

    @property
    def q(self) -> float:
        """Backed-up value if visited, else the Evaluate score, else 0."""
        if self.visits:
            return self.value
        return self.score if self.score is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "inner"}
        d["inner"] = self.inner.to_dict() if self.inner is not None else None
        for key in ("value", "score", "reward", "prior", "logprob"):
            if isinstance(d[key], float) and not math.isfinite(d[key]):
                d[key] = None  # JSON has no inf/nan
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        inner = d.get("inner")
        fields = {k: v for k, v in d.items() if k != "inner"}
        for key, default in (("value", 0.0), ("prior", 1.0), ("logprob", 0.0)):
            if fields.get(key) is None:
                fields[key] = default
        return cls(**fields, inner=SearchGraph.from_dict(inner) if inner else None)


@dataclass
class SearchGraph:
    """One prompt's reasoning structure: nodes by id (root 0), its trace, its cost.

    ``prompt`` is what the policy sees before the first step; ``meta`` carries the query's
    metadata (``question``, ``ground_truth``, ``task`` ...) for scorers and exporters.
    """

    prompt: str
    kind: StructureKind = "tree"
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_ids: list[int] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    trace: list[TraceEvent] = field(default_factory=list)
    round: int = 0
    cost: Any = None  # a budget.Cost, set by the strategy (kept untyped to avoid an import cycle)

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes.append(Node(id=0, kind="root", text=""))

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def add(self, parents: list[Node] | Node, **fields: Any) -> Node:
        """Attach a new node under ``parents`` (a chain or tree allows exactly one parent)."""
        parents = [parents] if isinstance(parents, Node) else list(parents)
        if not parents:
            raise DataError("a new node needs at least one parent", where="SearchGraph.add")
        if len(parents) > 1 and self.kind != "graph":
            raise DataError(
                f"a {self.kind} node has one parent; got {len(parents)}",
                where="SearchGraph.add",
                fix="use kind='graph' for Aggregate",
            )
        if self.kind == "chain" and parents[0].children:
            raise DataError("a chain node has at most one child", where="SearchGraph.add")
        fields.setdefault("depth", max(p.depth for p in parents) + 1)
        node = Node(id=len(self.nodes), parents=[p.id for p in parents], **fields)
        self.nodes.append(node)
        for p in parents:
            p.children.append(node.id)
        return node

    def record(self, op: str, inputs: list[int], outputs: list[int], **info: Any) -> None:
        """Append an operator application to the trace."""
        self.trace.append(TraceEvent(op, self.round, list(inputs), list(outputs), info))

    def children(self, node: Node, include_pruned: bool = False) -> list[Node]:
        kids = [self.nodes[c] for c in node.children]
        return kids if include_pruned else [k for k in kids if not k.pruned]

    def path(self, node: Node) -> list[Node]:
        """Nodes from the root (or the nearest standalone ancestor) to ``node``, root excluded.

        In a graph the first parent is followed; an aggregated node is standalone, so its
        path starts at itself.
        """
        out: list[Node] = []
        cur: Node | None = node
        while cur is not None and cur.id != 0:
            out.append(cur)
            if cur.standalone:
                break
            cur = self.nodes[cur.parent] if cur.parent is not None else None
        return out[::-1]

    def path_text(self, node: Node) -> str:
        """The generated text of the path to ``node`` (without the prompt)."""
        return "".join(n.text for n in self.path(node))

    def path_ids(self, node: Node) -> list[int] | None:
        """Prompt ids + the path's token ids, or None when some piece has no ids."""
        path = self.path(node)
        if not self.prompt_ids or any(not n.token_ids and n.text for n in path):
            return None
        if path and path[0].standalone:
            return None  # a standalone node's text was generated from another prompt
        return self.prompt_ids + [t for n in path for t in n.token_ids]

    def leaves(self, include_pruned: bool = False) -> list[Node]:
        return [
            n
            for n in self.nodes[1:]
            if not self.children(n, include_pruned) and (include_pruned or not n.pruned)
        ]

    def terminals(self, kinds: tuple[str, ...] | None = None) -> list[Node]:
        """Terminal nodes (optionally only of the given kinds), pruned ones included."""
        return [n for n in self.nodes if n.terminal and (kinds is None or n.kind in kinds)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "kind": self.kind,
            "meta": self.meta,
            "prompt_ids": self.prompt_ids,
            "round": self.round,
            "nodes": [n.to_dict() for n in self.nodes],
            "trace": [asdict(e) for e in self.trace],
            "cost": self.cost.to_dict() if hasattr(self.cost, "to_dict") else self.cost,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchGraph:
        """Inverse of `to_dict`; ``cost`` stays a plain dict unless the caller rebuilds it."""
        try:
            return cls(
                prompt=d["prompt"],
                kind=d.get("kind", "tree"),
                meta=dict(d.get("meta") or {}),
                prompt_ids=list(d.get("prompt_ids") or []),
                nodes=[Node.from_dict(n) for n in d["nodes"]],
                trace=[TraceEvent(**e) for e in d.get("trace") or []],
                round=int(d.get("round", 0)),
                cost=d.get("cost"),
            )
        except (KeyError, TypeError) as exc:
            raise DataError(f"not a search graph record: {exc}", where="SearchGraph.from_dict") from None


def chain_from_steps(prompt: str, steps: list[str], step_sep: str = "", **meta: Any) -> SearchGraph:
    """A chain structure whose nodes are ``steps`` (joined by ``step_sep`` in the path text)."""
    graph = SearchGraph(prompt=prompt, kind="chain", meta=dict(meta))
    node = graph.root
    for i, step in enumerate(steps):
        text = step + (step_sep if i < len(steps) - 1 else "")
        node = graph.add(node, text=text, meta={"step": step})
    if node.id:
        node.terminal = True
    return graph


def text_steps(text: str, step_sep: str) -> list[str]:
    """The steps of one node's text: split on ``step_sep``, stripped, empty pieces dropped."""
    pieces = text.split(step_sep) if step_sep else [text]
    return [p.strip() for p in pieces if p.strip()]


def path_steps(graph: SearchGraph, node: Node, step_sep: str) -> list[str]:
    """The reasoning steps on the path to ``node`` (a node holding a chain contributes each)."""
    return [s for n in graph.path(node) for s in text_steps(n.text, step_sep)]
