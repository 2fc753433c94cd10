"""A deterministic scripted environment: a policy and a scorer driven by tables.

Made for tests and worked examples of search strategies, where the best path of a small
tree is known in advance. Tokens are characters (``id = ord(ch)``), so prompts given as
token ids decode exactly and token counts are easy to check by hand.

`ScriptedPolicy` maps a full prefix (prompt + text so far) to its possible next pieces
``[(text, logprob), ...]``. A sample keeps appending pieces until a prefix has no entry
(the end of a chain: finish ``"stop"``), a stop string appears (cut after it), or the token
cap is hit (finish ``"length"``). At temperature 0 it takes the most likely piece; else
the j-th draw from a prefix within a call takes option ``(j // stride) % len(options)`` at each level, stride
being the product of the branching factors above, so n samples enumerate the leaves in
order -- diverse and reproducible. ``rules`` answer prompts outside the table (Refine,
Aggregate, critique prompts) by substring. Every call is logged in ``calls``.

`ScriptedScorer` scores each step by a table (step text -> value), with a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from posttrain.rollout.sampling import SamplingParams
from posttrain.search.protocols import ScoreRequest, SearchCompletion


def encode(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


@dataclass
class ScriptedPolicy:
    """A policy whose continuations come from ``tree`` (prefix -> [(piece, logprob), ...])."""

    tree: dict[str, list[tuple[str, float]]]
    rules: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    """Options for prompts not in ``tree`` that contain the key (e.g. a Refine prompt)."""
    num_parameters: int = 0
    calls: list[tuple[int, SamplingParams]] = field(default_factory=list)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams) -> list[SearchCompletion]:
        self.calls.append((len(prompts), params))
        out, drawn = [], {}
        for i, prompt in enumerate(prompts):
            prefix = prompt if isinstance(prompt, str) else decode(prompt)
            for j in range(params.n):
                # count draws per prefix, so a prompt repeated with n=1 still enumerates options
                k = drawn[prefix] = drawn.get(prefix, -1) + 1
                text, lps, reason = self._sample(prefix, k, params)
                out.append(SearchCompletion(i, j, encode(prefix), encode(text), text, lps, reason))
        return out

    def _sample(self, prefix: str, j: int, params: SamplingParams) -> tuple[str, list[float], str]:
        out, lps, stride = "", [], 1
        while True:
            options = self.tree.get(prefix + out)
            if options is None and not out:
                options = next((v for k, v in self.rules.items() if k in prefix), None)
            if not options:
                return out, lps, "stop"
            if params.greedy:
                idx = max(range(len(options)), key=lambda k: options[k][1])
            else:
                idx = (j // stride) % len(options)
                stride *= len(options)
            piece, lp = options[idx]
            cut = min((piece.find(s) + len(s) for s in params.stop if s in piece), default=None)
            reason = "stop" if cut is not None else ""
            piece = piece[:cut] if cut is not None else piece
            if len(out) + len(piece) > params.max_new_tokens:
                piece, reason = piece[: params.max_new_tokens - len(out)], "length"
            out += piece
            lps += [lp] + [0.0] * (len(piece) - 1) if piece else []
            if reason:
                return out, lps, reason


@dataclass
class ScriptedScorer:
    """Per-step scores from ``values`` (stripped step text -> score); unknown steps get ``default``."""

    values: dict[str, float]
    default: float = 0.0
    num_parameters: int = 0
    calls: list[int] = field(default_factory=list)

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        self.calls.append(len(requests))
        return [[self.values.get(s.strip(), self.default) for s in r.steps] for r in requests]
