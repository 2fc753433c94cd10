"""AI judge (RLAIF): a local model scores a response against a written constitution.

The judge model sees `JUDGE_TEMPLATE` (the constitution, the request, the response) as a user
message and is asked to end with ``Score: N``, N an integer from 1 to 10. `parse_score`
reads the verdict robustly:

1. the number right after the LAST ``Score`` marker (case-insensitive; ``Score: 7``,
   ``**Score**: 7``, ``score = 7/10`` all give 7; the last one wins because models often
   restate the instructions before answering);
2. else the first number anywhere in the text;
3. else unparseable: reward 0.0 with ``info["why"] == "unparseable"``.
A number outside [1, 10] is clamped (``info["clamped"]``). The reward is ``(s - 1) / 9`` in
[0, 1]; ``info["raw"]`` keeps s and ``info["verdict"]`` the judge's text.

Generation is a parameter: ``generate(chat_prompts) -> list[str]``, so any backend (HF, vLLM,
an API, a stub in tests) plugs in; `hf_generate` builds one from any model posttrain loads.
`Judge` is a reward function, and ``Judge.ask`` fits the rubric's judge protocol
(`posttrain.rewards.rubric`), with the criterion's question as the constitution. The
registered reward ``judge`` reads the judge model folder from ``metadata["judge_model"]``
(and optionally ``metadata["constitution"]``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from posttrain.errors import DataError
from posttrain.rewards.registry import RewardResult

Generate = Callable[[list[list[dict]]], list[str]]

DEFAULT_CONSTITUTION = """\
1. Correct: the response answers the request, and its final answer is right.
2. Sound: every reasoning step follows from the previous ones; no step is wrong or skipped.
3. Honest: it invents no facts and says so when it is unsure.
4. Harmless: it refuses clearly dangerous requests and treats people with respect.
5. Clear: it is concise, with no padding or repetition."""

JUDGE_TEMPLATE = """\
You are an impartial judge. Rate the response against the constitution.

Constitution:
{constitution}

Request:
{prompt}

Response:
{response}

Give one sentence of reasoning, then a last line "Score: N" with N an integer from \
{lo} (violates the constitution) to {hi} (follows it fully)."""

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_AFTER_SCORE = re.compile(r"score[\s*_:=]*" + _NUMBER, re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def parse_score(text: str, lo: int = 1, hi: int = 10) -> tuple[float | None, dict[str, Any]]:
    """The judge's score in [lo, hi] (None when there is no number) and how it was read."""
    after = _AFTER_SCORE.findall(text)
    if after:
        value, how = float(after[-1]), "after 'Score'"
    else:
        first = _ANY_NUMBER.search(text)
        if first is None:
            return None, {"why": "unparseable"}
        value, how = float(first.group(1)), "first number"
    clamped = min(max(value, lo), hi)
    info: dict[str, Any] = {"why": f"{how}: {value:g}", "raw": clamped}
    if clamped != value:
        info["clamped"] = True
    return clamped, info


def prompt_text(prompt: str | list[dict]) -> str:
    """A chat prompt as plain text: a lone user message as is, else ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0].get("content", "")
    return "\n".join(f"{m.get('role')}: {m.get('content', '')}" for m in prompt)


class Judge:
    """Scores responses with a model's verdict against a constitution (a reward function)."""

    def __init__(
        self,
        generate: Generate,
        constitution: str = DEFAULT_CONSTITUTION,
        template: str = JUDGE_TEMPLATE,
        lo: int = 1,
        hi: int = 10,
        max_chars: int = 4000,
    ):
        if lo >= hi:
            raise ValueError(f"judge score range needs lo < hi, got {lo}..{hi}")
        self.generate, self.constitution, self.template = generate, constitution, template
        self.lo, self.hi, self.max_chars = lo, hi, max_chars

    def judge_prompts(
        self, prompts: list, completions: list[str], constitution: str | None = None
    ) -> list[list[dict]]:
        """The chat prompts sent to the judge model (responses cut to `max_chars`)."""
        text = constitution or self.constitution
        return [
            [
                {
                    "role": "user",
                    "content": self.template.format(
                        constitution=text,
                        prompt=prompt_text(p),
                        response=c[: self.max_chars],
                        lo=self.lo,
                        hi=self.hi,
                    ),
                }
            ]
            for p, c in zip(prompts, completions, strict=True)
        ]

    def score(
        self, prompts: list, completions: list[str], constitution: str | None = None
    ) -> list[RewardResult]:
        """One `RewardResult` per response: ``(s - lo) / (hi - lo)``, or 0.0 if unparseable."""
        verdicts = list(self.generate(self.judge_prompts(prompts, completions, constitution)))
        if len(verdicts) != len(completions):
            raise DataError(
                f"the judge's generate returned {len(verdicts)} texts for {len(completions)} prompts"
            )
        out = []
        for text in verdicts:
            value, info = parse_score(text, self.lo, self.hi)
            reward = 0.0 if value is None else (value - self.lo) / (self.hi - self.lo)
            out.append(RewardResult(reward, {**info, "verdict": text[:500]}))
        return out

    def __call__(
        self, prompts: list, completions: list[str], metadata: list[dict] | None = None
    ) -> list[RewardResult]:
        return self.score(prompts, completions)

    def ask(self, prompts: list, completions: list[str], question: str) -> list[float]:
        """The rubric judge protocol: scores in [0, 1] for one criterion (`question` is the constitution)."""
        return [r.score for r in self.score(prompts, completions, question)]


def hf_generate(
    model: Any, tokenizer: Any = None, max_new_tokens: int = 64, batch_size: int = 16
) -> Generate:
    """A greedy `generate` over chat prompts from a model folder (or a loaded model + tokenizer)."""
    from posttrain.eval.accuracy import generate_batch

    if isinstance(model, str):
        from posttrain.models.load import load_model, load_tokenizer

        tokenizer = load_tokenizer(model)
        model = load_model(model, tokenizer=tokenizer)

    def generate(chats: list[list[dict]]) -> list[str]:
        return [text for text, _ in generate_batch(model, tokenizer, chats, max_new_tokens, batch_size)]

    return generate


@functools.lru_cache(maxsize=2)
def cached_judge(path: str) -> Judge:
    """A `Judge` over the model folder `path` (default constitution), loaded once."""
    return Judge(hf_generate(path))


def judge_reward(prompts: list, completions: list[str], metadata: list[dict]) -> list[RewardResult]:
    """The registered ``judge`` reward: model from ``metadata["judge_model"]``, optional ``constitution``."""
    results: list[RewardResult | None] = [None] * len(completions)
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i, meta in enumerate(metadata):
        path = meta.get("judge_model") if isinstance(meta, dict) else None
        if not isinstance(path, str):
            raise DataError(
                "the 'judge' reward needs the judge model folder in metadata 'judge_model'",
                where=f"metadata[{i}].judge_model",
                fix="set it, or register your own: register_reward('my_judge')(Judge(hf_generate(PATH)))",
            )
        groups.setdefault((path, meta.get("constitution")), []).append(i)
    for (path, constitution), rows in groups.items():
        out = cached_judge(path).score(
            [prompts[i] for i in rows], [completions[i] for i in rows], constitution
        )
        for i, res in zip(rows, out, strict=True):
            results[i] = res
    return results  # type: ignore[return-value]
