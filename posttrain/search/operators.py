"""Generative and evaluation operators: Generate/Expand, Refine, Aggregate, critique, Evaluate.

Pure functions over `SearchGraph`s and the policy / scorer protocols: each takes every
target of a round -- across all prompts and trees -- and makes ONE ``policy.generate``
(or ``scorer.score``) call, charges each prompt's ``graph.cost``, enforces the `Budget`
(see `posttrain.search.budget`) and appends its application to each ``graph.trace``.

Generation requests (`GenRequest`) say which nodes a new node hangs under, how many
samples, and what prompt: by default the path of the first parent (token ids when the
policy returned them, else text); Refine and Aggregate give their own prompt and create
``standalone`` nodes holding a whole chain. `run_requests` executes any mix of requests
in one call, so a strategy can fuse e.g. refinements and aggregations into one round.

Terminal rule by granularity: ``chain`` nodes are terminal; ``token`` nodes unless they
stopped on the token cap; ``step`` nodes unless their text ends with the step separator
(a step that ran into ``max_step_tokens`` ends its path, ``meta["truncated"]``). Any node
at ``max_depth`` is terminal. Priors for PUCT are the softmax over siblings of their
length-normalised log-likelihoods, ``p_i ∝ exp(logprob_i / len_i)`` (uniform without
logprobs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.errors import ConfigError
from posttrain.rollout.sampling import SamplingParams
from posttrain.search.budget import Budget, charge_generation, charge_scoring, param_count
from posttrain.search.protocols import CompletionLike, PolicyLike, Scorer, ScoreRequest
from posttrain.search.structures import Granularity, Node, SearchGraph, StepConfig, path_steps

Aggregation = Literal["last", "min", "prod", "mean"]
Target = tuple[SearchGraph, Node]


@dataclass
class GenRequest:
    """One generation request: ``n`` new nodes under ``parents`` from ``prompt`` (None = path)."""

    graph: SearchGraph
    parents: list[Node]
    n: int = 1
    prompt: str | None = None
    kind: str = "step"
    standalone: bool = False
    op: str = "expand"
    info: dict[str, Any] = field(default_factory=dict)


def params_for(params: SamplingParams, step: StepConfig, mode: Granularity) -> SamplingParams:
    """``params`` with the token cap and stop strings of one node at granularity ``mode``."""
    if mode == "token":
        return params.replace(max_new_tokens=step.tokens_per_step)
    if mode == "step":
        stop = list(params.stop) + ([step.step_sep] if step.step_sep not in params.stop else [])
        return params.replace(max_new_tokens=step.max_step_tokens, stop=stop)
    return params.replace(max_new_tokens=step.max_new_tokens)


def _prompt_of(req: GenRequest) -> tuple[str | list[int], int]:
    """The prompt to send and its token count (exact with ids; else the known part, maybe 0)."""
    g = req.graph
    if req.prompt is not None:
        return req.prompt, 0
    parent = req.parents[0]
    ids = g.path_ids(parent)
    if ids is not None:
        return ids, len(ids)
    known = len(g.prompt_ids) + sum(len(n.token_ids) for n in g.path(parent)) if g.prompt_ids else 0
    return g.prompt + g.path_text(parent), known


def _admit(
    requests: Sequence[GenRequest], est: list[int], cap: int, budget: Budget | None, params: int
) -> tuple[list[int], int]:
    """Indices of requests whose prompt still has budget, and the call's token cap.

    A prompt whose allowance is below ``min(cap // 4, 16)`` tokens per sequence stops (so a
    nearly spent prompt does not shrink everyone's nodes); the others share the smallest
    allowance, so no prompt ever generates past its budget.
    """
    if budget is None:
        return list(range(len(requests))), cap
    per_graph: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        per_graph.setdefault(id(r.graph), []).append(i)
    keep: list[int] = []
    for rows in per_graph.values():
        g = requests[rows[0]].graph
        n_seq = sum(requests[i].n for i in rows)
        allow = budget.allowance(g.cost, sum(est[i] for i in rows), n_seq, params)
        allow = cap if allow is None else allow
        if allow >= max(1, min(cap // 4, 16)):
            keep += rows
            cap = min(cap, allow)
    return sorted(keep), cap


def generate_raw(
    policy: PolicyLike,
    requests: Sequence[GenRequest],
    params: SamplingParams,
    budget: Budget | None = None,
) -> list[list[CompletionLike] | None]:
    """One policy call for all admitted requests: their completions (None = refused by budget).

    Equal ``n`` across requests is sent as ``params.n`` (prefix sharing in the engine);
    unequal ones as repeated prompts with ``n = 1``. Charges each prompt's cost once.
    """
    prompts_est = [_prompt_of(r) for r in requests]
    pp = param_count(policy)
    keep, cap = _admit(requests, [e for _, e in prompts_est], params.max_new_tokens, budget, pp)
    out: list[list[CompletionLike] | None] = [None] * len(requests)
    if not keep:
        return out
    same_n = len({requests[i].n for i in keep}) == 1
    prompts = (
        [prompts_est[i][0] for i in keep]
        if same_n
        else [prompts_est[i][0] for i in keep for _ in range(requests[i].n)]
    )
    owner = keep if same_n else [i for i in keep for _ in range(requests[i].n)]
    call = params.replace(n=requests[keep[0]].n if same_n else 1, max_new_tokens=cap)
    completions = policy.generate(prompts, call)
    for i in keep:
        out[i] = []
    for c in completions:
        out[owner[c.prompt_index]].append(c)  # type: ignore[union-attr]
    _charge(requests, keep, out, prompts_est, pp)
    return out


def _charge(requests, keep, out, prompts_est, policy_params: int) -> None:
    by_graph: dict[int, list[int]] = {}
    for i in keep:
        by_graph.setdefault(id(requests[i].graph), []).append(i)
    for rows in by_graph.values():
        prompt_tokens = 0
        for i in rows:  # a request's prompt is prefilled once, whatever its n
            first = out[i][0] if out[i] else None
            prompt_tokens += len(first.prompt_ids) if first and first.prompt_ids else prompts_est[i][1]
        generated = sum(len(c.token_ids) for i in rows for c in out[i])
        charge_generation(requests[rows[0]].graph.cost, prompt_tokens, generated, policy_params)


def _is_terminal(c: CompletionLike, mode: Granularity, step: StepConfig, depth: int) -> tuple[bool, dict]:
    meta: dict[str, Any] = {}
    if mode == "chain":
        done = True
    elif mode == "token":
        done = c.finish_reason != "length"
    else:
        done = not c.text.endswith(step.step_sep)
        if done and c.finish_reason == "length":
            meta["truncated"] = True
    if not done and depth >= step.max_depth:
        done, meta["depth_limit"] = True, True
    return done, meta


def set_priors(graph: SearchGraph, parent: Node) -> None:
    """Priors of ``parent``'s children: softmax of length-normalised log-likelihoods."""
    kids = graph.children(parent, include_pruned=True)
    if not kids:
        return
    logits = [k.logprob / max(1, len(k.token_ids)) for k in kids]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    for k, w in zip(kids, weights, strict=True):
        k.prior = w / total


def run_requests(
    policy: PolicyLike,
    requests: Sequence[GenRequest],
    params: SamplingParams,
    step: StepConfig,
    budget: Budget | None = None,
    mode: Granularity | None = None,
) -> list[list[Node]]:
    """Execute ``requests`` in ONE policy call; the new nodes of each (empty if refused)."""
    mode = mode or step.granularity
    call = params_for(params, step, mode)
    if any(r.prompt is None for r in requests) and not step.continue_with_ids:
        requests = [r if r.prompt is not None else _as_text(r) for r in requests]
    raw = generate_raw(policy, requests, call, budget)
    new: list[list[Node]] = []
    for req, comps in zip(requests, raw, strict=True):
        g, nodes = req.graph, []
        for c in comps or []:
            if (
                req.prompt in (None, g.prompt)
                and req.parents[0].id == 0
                and not g.prompt_ids
                and c.prompt_ids
            ):
                g.prompt_ids = list(c.prompt_ids)
            depth = max(p.depth for p in req.parents) + 1
            terminal, meta = _is_terminal(c, mode, step, depth)
            nodes.append(
                g.add(
                    req.parents,
                    text=c.text,
                    token_ids=list(c.token_ids),
                    logprob=float(sum(c.logprobs or [])),
                    finish_reason=c.finish_reason,
                    kind=req.kind,
                    standalone=req.standalone,
                    terminal=terminal,
                    meta=meta,
                )
            )
        if nodes and req.kind == "step":
            set_priors(g, req.parents[0])
        info = {"n": req.n, "temperature": call.temperature, "granularity": mode, **req.info}
        g.record(req.op, [p.id for p in req.parents], [n.id for n in nodes], refused=comps is None, **info)
        new.append(nodes)
    return new


def _as_text(req: GenRequest) -> GenRequest:
    g, parent = req.graph, req.parents[0]
    return GenRequest(
        g, req.parents, req.n, g.prompt + g.path_text(parent), req.kind, False, req.op, req.info
    )


def expand(
    policy: PolicyLike,
    targets: Sequence[Target],
    k: int,
    params: SamplingParams,
    step: StepConfig,
    budget: Budget | None = None,
    mode: Granularity | None = None,
    kind: str = "step",
) -> list[list[Node]]:
    """Generate/Expand: ``k`` children under each target node (diversity from temperature)."""
    if k < 1:
        raise ConfigError(f"expand needs k >= 1, got {k}", where="expand.k")
    reqs = [GenRequest(g, [n], n=k, kind=kind, op="expand" if kind == "step" else kind) for g, n in targets]
    return run_requests(policy, reqs, params, step, budget, mode)


def refine_requests(
    targets: Sequence[Target], critiques: Sequence[str], build_prompt: Callable[[SearchGraph, Node, str], str]
) -> list[GenRequest]:
    """Refine requests: a revised whole chain under each target, prompted with its critique."""
    return [
        GenRequest(g, [n], 1, build_prompt(g, n, crit), "refined", True, "refine", {"critique": crit})
        for (g, n), crit in zip(targets, critiques, strict=True)
    ]


def aggregate_requests(
    groups: Sequence[tuple[SearchGraph, list[Node]]], build_prompt: Callable[[SearchGraph, list[Node]], str]
) -> list[GenRequest]:
    """Aggregate requests: one new chain merging several nodes/paths (a node with several parents)."""
    return [
        GenRequest(g, list(ns), 1, build_prompt(g, list(ns)), "aggregate", True, "aggregate")
        for g, ns in groups
    ]


def refine(policy, targets, critiques, build_prompt, params, step, budget=None) -> list[list[Node]]:
    """Refine: revise each target's answer from a critique (one call, chain granularity)."""
    return run_requests(
        policy, refine_requests(targets, critiques, build_prompt), params, step, budget, "chain"
    )


def aggregate(policy, groups, build_prompt, params, step, budget=None) -> list[list[Node]]:
    """Aggregate: merge each group of nodes into one new node (one call, chain granularity)."""
    return run_requests(policy, aggregate_requests(groups, build_prompt), params, step, budget, "chain")


def critique(
    policy: PolicyLike,
    targets: Sequence[Target],
    build_prompt: Callable[[SearchGraph, Node], str],
    params: SamplingParams,
    budget: Budget | None = None,
) -> list[str | None]:
    """Ask the policy for feedback on each target's path (one call); None where refused.

    The critique is stored in ``node.meta["critique"]``; the structure is unchanged.
    """
    reqs = [GenRequest(g, [n], 1, build_prompt(g, n), op="critique") for g, n in targets]
    raw = generate_raw(policy, reqs, params.replace(n=1), budget)
    out: list[str | None] = []
    for (g, n), comps in zip(targets, raw, strict=True):
        text = comps[0].text if comps else None
        if text is not None:
            n.meta["critique"] = text
        g.record("critique", [n.id], [], refused=comps is None, critique=text)
        out.append(text)
    return out


def _aggregate(scores: list[float], how: Aggregation) -> float | None:
    if not scores:
        return None
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    return sum(scores) / len(scores)


def evaluate(
    scorer: Scorer,
    targets: Sequence[Target],
    how: Aggregation = "last",
    step_sep: str = "<step>",
    budget: Budget | None = None,
    into: Literal["score", "reward"] = "score",
) -> list[float | None]:
    """Evaluate: score each target's path in ONE scorer call; None where the budget refused.

    The scorer returns per-step scores (`ScoreRequest.steps`); a single number counts as
    the last step's. They are kept in ``node.step_scores`` and reduced by ``how`` (PRM
    last step / min / product / mean) into ``node.score`` -- or ``node.reward`` with
    ``into="reward"`` (an outcome verifier on terminal nodes).
    """
    sp = param_count(scorer)
    keep = [i for i, (g, _) in enumerate(targets) if budget is None or budget.can_score(g.cost)]
    requests = []
    for i in keep:
        g, n = targets[i]
        text = g.path_text(n)
        requests.append(ScoreRequest(g.prompt, path_steps(g, n, step_sep), text, n.terminal, g.meta))
    scores = scorer.score(requests) if requests else []
    if len(scores) != len(requests):
        raise ConfigError(f"scorer returned {len(scores)} results for {len(requests)} paths", where="scorer")
    out: list[float | None] = [None] * len(targets)
    tokens: dict[int, tuple[SearchGraph, int, int]] = {}
    for i, got in zip(keep, scores, strict=True):
        g, n = targets[i]
        per_step = [float(got)] if isinstance(got, int | float) else [float(x) for x in got]
        n.step_scores = per_step
        value = _aggregate(per_step, how)
        setattr(n, into, value)
        out[i] = value
        path_tokens = len(g.prompt_ids) + sum(len(p.token_ids) for p in g.path(n))
        _, items, tok = tokens.get(id(g), (g, 0, 0))
        tokens[id(g)] = (g, items + 1, tok + path_tokens)
        g.record("evaluate", [n.id], [], how=how, into=into, value=value, step_scores=per_step)
    for g, items, tok in tokens.values():
        charge_scoring(g.cost, items, tok, sp)
    return out


def evaluate_likelihood(targets: Sequence[Target], normalize: bool = True) -> list[float]:
    """Evaluate by policy likelihood (no model call): ``exp(mean token logprob)`` of the path.

    With ``normalize=False`` the score is the path's total log-likelihood.
    """
    out = []
    for g, n in targets:
        path = g.path(n)
        lp = sum(p.logprob for p in path)
        length = sum(len(p.token_ids) for p in path)
        n.score = math.exp(lp / max(1, length)) if normalize else lp
        g.record("evaluate", [n.id], [], how="likelihood", value=n.score)
        out.append(n.score)
    return out
