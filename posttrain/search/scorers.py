"""Scorers for the Evaluate operator: verifiers, reward functions, an oracle PRM, an AI judge.

All follow `posttrain.search.protocols.Scorer`: ``score(requests) -> per-step scores``.
Outcome scorers (verifier, ORM, reward function, judge) give every step 0 except the last,
which carries the outcome; on a non-terminal path they return ``pending`` there (a path
that has no answer yet cannot be verified). Learned PRMs and value models plug in through
`FunctionScorer` (or any object with a matching ``score`` method).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.errors import DataError
from posttrain.rollout.sampling import SamplingParams
from posttrain.search.protocols import PolicyLike, ScoreRequest


def _outcome_row(req: ScoreRequest, value: float) -> list[float]:
    return [0.0] * (len(req.steps) - 1) + [value] if req.steps else [value]


@dataclass
class FunctionScorer:
    """Wrap ``fn(requests) -> per-step scores`` (e.g. a learned PRM's batched scoring)."""

    fn: Callable[[list[ScoreRequest]], list[list[float]]]
    num_parameters: int = 0

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        return self.fn(requests)


@dataclass
class VerifierScorer:
    """An outcome verifier ``verify(text, metadata) -> bool | float`` on terminal paths."""

    verify: Callable[[str, dict[str, Any]], bool | float]
    pending: float = 0.0
    num_parameters: int = 0

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        return [
            _outcome_row(r, float(self.verify(r.text, r.metadata)) if r.terminal else self.pending)
            for r in requests
        ]


def _task_and_gold(meta: dict[str, Any]) -> tuple[Any, str]:
    from posttrain.data.tasks import get_task

    if "task" not in meta or "ground_truth" not in meta:
        raise DataError(
            "task scoring needs metadata 'task' and 'ground_truth'",
            where="query.metadata",
            fix="build queries with posttrain.search.queries_from_problems",
        )
    return get_task(meta["task"]), str(meta["ground_truth"])


def task_verifier(pending: float = 0.0) -> VerifierScorer:
    """The task suite's verifier (``metadata["task"]``, ``["ground_truth"]``) as an outcome scorer."""

    def verify(text: str, meta: dict[str, Any]) -> bool:
        task, gold = _task_and_gold(meta)
        return task.verify(text, gold)

    return VerifierScorer(verify, pending)


def any_verifier(pending: float = 0.0) -> VerifierScorer:
    """The true answer check of any query: the task's verifier when ``metadata["task"]`` is set,
    else the reward named by ``metadata["scorer"]`` (a prompt record's), passing at score >= 0.5."""

    def verify(text: str, meta: dict[str, Any]) -> bool:
        if "task" in meta:
            task, gold = _task_and_gold(meta)
            return task.verify(text, gold)
        if not isinstance(meta.get("scorer"), str):
            raise DataError(
                "the verifier needs metadata 'task' or 'scorer' (and 'ground_truth')",
                where="query.metadata",
                fix="give each prompt record metadata.scorer, e.g. {scorer: math, ground_truth: '42'}",
            )
        from posttrain.rewards.registry import score_batch

        prompt = [{"role": "user", "content": str(meta.get("question", ""))}]
        return score_batch([prompt], [text], [meta])[0].score >= 0.5

    return VerifierScorer(verify, pending)


@dataclass
class TaskStepScorer:
    """An oracle PRM from the task suite: step i scores 1 iff ``task.check_steps`` accepts it.

    The steps compared are those `posttrain.data.tasks.split_steps` finds in the path
    text (the chain inside ``<think>``), aligned by position; a terminal path's last
    score is also 0 unless the final answer verifies. Needs ``question``, ``task`` and
    ``ground_truth`` in the query metadata.
    """

    step_sep: str = "<step>"
    num_parameters: int = 0

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        from posttrain.data.tasks import Problem, split_steps

        out = []
        for r in requests:
            task, gold = _task_and_gold(r.metadata)
            problem = Problem(task.name, int(r.metadata.get("level", 1)), r.metadata["question"], (), gold)
            chain = split_steps(r.text, self.step_sep)
            labels = [float(x) for x in task.check_steps(problem, chain)] if chain else []
            row = [labels[min(i, len(labels) - 1)] if labels else 0.0 for i in range(len(r.steps))]
            if r.terminal and row:
                row[-1] = min(row[-1], float(task.verify(r.text, gold)))
            out.append(row)
        return out


@dataclass
class RewardScorer:
    """A registered reward function (`posttrain.rewards.registry`) as an outcome scorer."""

    name: str
    pending: float = 0.0
    num_parameters: int = 0

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        from posttrain.rewards.registry import as_results, get_reward

        done = [i for i, r in enumerate(requests) if r.terminal]
        values = {i: self.pending for i in range(len(requests))}
        if done:
            fn = get_reward(self.name)
            got = fn([requests[i].prompt for i in done], [requests[i].text for i in done],
                     [requests[i].metadata for i in done])  # fmt: skip
            for i, res in zip(done, as_results(got, len(done), self.name), strict=True):
                values[i] = res.score
        return [_outcome_row(r, values[i]) for i, r in enumerate(requests)]


def default_judge_prompt(req: ScoreRequest) -> str:
    question = req.metadata.get("question", req.prompt)
    return f"Question: {question}\nProposed solution: {req.text}\nIs the solution correct? Answer yes or no: "


def parse_yes_no(text: str) -> float:
    """1.0 if the judge's reply starts with yes, 0.0 otherwise."""
    return 1.0 if text.strip().lower().startswith("yes") else 0.0


@dataclass
class JudgeScorer:
    """An AI judge: the policy (or another model) rates each path from a prompt, in one call.

    Its generations are charged as scorer calls (the judge is the scorer here).
    """

    policy: PolicyLike
    build_prompt: Callable[[ScoreRequest], str] = default_judge_prompt
    parse: Callable[[str], float] = parse_yes_no
    max_new_tokens: int = 8
    num_parameters: int = 0

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        if not requests:
            return []
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
        comps = self.policy.generate([self.build_prompt(r) for r in requests], params)
        by_prompt: Sequence = sorted(comps, key=lambda c: c.prompt_index)
        return [_outcome_row(r, self.parse(c.text)) for r, c in zip(requests, by_prompt, strict=True)]


class RewardModelScorer:
    """A trained process or outcome reward model as a `Scorer`.

    ``reward`` is a model folder (loaded as `posttrain.rewards.models.ModelScorer`) or any
    reward function ``fn(prompts, completions, metadata) -> RewardResults``. The path text is
    scored as written (``<think>s1<step>s2...``): a PRM's per-step probabilities
    (``info["steps"]``, one per step-end token) become the step scores, aligned from the first
    step (a step still being written, with no end token yet, repeats the last probability);
    without them the single score goes on the last step (an ORM).
    """

    def __init__(self, reward: Any):
        if isinstance(reward, str):
            from posttrain.rewards.models import ModelScorer

            reward = ModelScorer(reward)
        self.reward = reward

    @property
    def num_parameters(self) -> int:
        from posttrain.search.budget import param_count

        return param_count(self.reward)

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        from posttrain.rewards.registry import as_results

        prompts = [
            [{"role": "user", "content": str(r.metadata.get("question") or r.prompt)}] for r in requests
        ]
        raw = self.reward(prompts, [r.text for r in requests], [r.metadata for r in requests])
        out = []
        for r, res in zip(requests, as_results(raw, len(requests), "reward_model"), strict=True):
            probs = [float(p) for p in res.info.get("steps") or []]
            if not probs:
                out.append(_outcome_row(r, res.score))
                continue
            n = max(len(r.steps), 1)
            out.append([probs[min(i, len(probs) - 1)] for i in range(n)])
        return out
