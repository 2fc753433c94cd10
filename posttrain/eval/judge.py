"""LLM-as-judge in evaluation: pointwise ratings and pairwise comparisons with position swap.

**Pointwise.** The judge sees the rubric (default: the RLAIF constitution of
`posttrain.rewards.judge`), the request and one response, and ends with ``Score: N`` (scale
``1-10``) or ``Verdict: PASS`` / ``Verdict: FAIL`` (scale ``pass_fail``). `parse_pointwise` reads
the LAST such marker (models restate the instructions first); a reply that is nothing but a
number or PASS/FAIL is read too. Anything else -- no marker, a score outside the scale -- is
*unparsable*: counted and reported (``unparsable_rate``), never given a score. The mean score
(1-10) or pass rate is over the parsed verdicts, with a 95% bootstrap interval.

**Pairwise.** Each pair (candidate response X, baseline response Y) is judged twice: with X shown
as A (order AB) and with X shown as B (order BA). The judge ends with ``Winner: A``, ``Winner:
B`` or ``Winner: tie`` (`parse_pairwise`). `combine_orders` maps both verdicts to the candidate's
outcome; when they agree that is the outcome, when they disagree (position bias) it is a *tie*;
when either is unparsable the pair is unparsable and left out. Reported (`pairwise_summary`):

- ``win_rate`` = mean over parsed pairs of 1 (win), 0.5 (tie), 0 (loss), with its 95% bootstrap
  interval; ``wins``, ``ties``, ``losses`` as fractions;
- ``position_consistency`` = the fraction of parsed pairs whose two verdicts agree;
- ``unparsable_rate`` = the fraction of pairs left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.errors import ConfigError
from posttrain.eval.metrics import mean_with_ci
from posttrain.rewards.judge import DEFAULT_CONSTITUTION, prompt_text

POINTWISE_TEMPLATE = """\
You are an impartial judge. Rate the response against the rubric.

Rubric:
{rubric}

Request:
{prompt}

Response:
{response}

Give one sentence of reasoning, then a last line {last_line}."""

LAST_LINE = {
    "1-10": '"Score: N" with N an integer from 1 (fails the rubric) to 10 (meets it fully)',
    "pass_fail": '"Verdict: PASS" if the response meets the rubric, else "Verdict: FAIL"',
}

PAIRWISE_TEMPLATE = """\
You are an impartial judge. Compare two responses to the same request against the rubric.

Rubric:
{rubric}

Request:
{prompt}

Response A:
{a}

Response B:
{b}

Give one sentence of reasoning, then a last line "Winner: A", "Winner: B" or "Winner: tie"."""

_SCORE = re.compile(r"score[\s*_:=]*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_SCORE = re.compile(r"^\W*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\W*$")
_VERDICT = re.compile(r"verdict[\s*_:=]*(pass|fail)", re.IGNORECASE)
_BARE_VERDICT = re.compile(r"^\W*(pass|fail)\W*$", re.IGNORECASE)
_WINNER = re.compile(r"winner[\s*_:=]*\(?\[?(a|b|tie)\b", re.IGNORECASE)
_BARE_WINNER = re.compile(r"^\W*(a|b|tie)\W*$", re.IGNORECASE)

Scale = Literal["1-10", "pass_fail"]


@dataclass
class JudgeConfig:
    """An LLM judge over the evaluation's responses (``judge:`` in an eval recipe)."""

    mode: Literal["off", "pointwise", "pairwise"] = "off"
    """``pointwise``: rate each response on the rubric; ``pairwise``: candidate vs baseline, both
    orders; ``off``: no judge."""
    model: str = ""
    """The judge: a local model folder (``default``: the embedded model)."""
    endpoint: str = ""
    """Or an OpenAI-compatible base URL (``http://127.0.0.1:8000/v1``); wins over ``model``."""
    endpoint_model: str = "judge"
    """The ``model`` field sent to the endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (sent only when set)."""
    rubric: str = ""
    """The rubric or constitution (empty: `posttrain.rewards.judge.DEFAULT_CONSTITUTION`)."""
    scale: Scale = "1-10"
    """Pointwise scale: ``1-10`` (``Score: N``) or ``pass_fail`` (``Verdict: PASS|FAIL``)."""
    candidate: str = ""
    """The decoding label whose first sample per problem is judged (empty: the first decoding)."""
    baseline: str = ""
    """Pairwise: another decoding label of this run, or another eval run's results.json (problems
    matched by question)."""
    max_new_tokens: int = 128
    """The judge's generation budget per verdict."""
    precision: str = "auto"
    """A local judge's decoding precision: auto (bf16 where the hardware computes it natively,
    `posttrain.rollout.hf_engine.decode_precision`) | fp32 | bf16."""
    max_chars: int = 4000
    """Responses are cut to this many characters in the judge prompt."""
    timeout_s: float = 30.0
    """Per-request timeout of the endpoint."""
    retries: int = 2
    """Endpoint retries after a timeout, connection error, 429 or 5xx."""
    concurrency: int = 4
    """Endpoint requests in flight at once."""

    def check(self, labels: list[str]) -> None:
        if self.mode == "off":
            return
        if not self.model and not self.endpoint:
            raise ConfigError("the judge has no model", where="judge.model",
                              fix="set judge.model=PATH (a local folder) or judge.endpoint=http://HOST:PORT/v1")  # fmt: skip
        if self.candidate and self.candidate not in labels:
            raise ConfigError(f"no decoding labelled {self.candidate!r}", where="judge.candidate",
                              fix=f"use one of {', '.join(labels)}")  # fmt: skip
        if self.mode == "pairwise":
            if not self.baseline:
                raise ConfigError("pairwise judging needs a baseline", where="judge.baseline",
                                  fix="name another decoding label or another run's results.json")  # fmt: skip
            if self.baseline not in labels and not self.baseline.endswith(".json"):
                raise ConfigError(f"judge.baseline {self.baseline!r} is neither a decoding label nor a "
                                  "results.json", where="judge.baseline", fix=f"use one of {', '.join(labels)}")  # fmt: skip
        if self.retries < 0 or self.timeout_s <= 0:
            raise ConfigError("judge.timeout_s must be > 0 and judge.retries >= 0", where="judge.timeout_s")


def parse_pointwise(text: str, scale: Scale = "1-10") -> float | None:
    """The verdict of a pointwise judge: a score in 1..10 or 1.0 / 0.0 for PASS / FAIL; None when
    unparsable (module docstring)."""
    if scale == "pass_fail":
        found = _VERDICT.findall(text) or _BARE_VERDICT.findall(text.strip())
        return None if not found else float(found[-1].lower() == "pass")
    found = _SCORE.findall(text) or _BARE_SCORE.findall(text.strip())
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def parse_pairwise(text: str) -> str | None:
    """``"A"``, ``"B"``, ``"tie"`` from the last ``Winner:`` marker (or a bare reply); else None."""
    found = _WINNER.findall(text) or _BARE_WINNER.findall(text.strip())
    if not found:
        return None
    v = found[-1].lower()
    return "tie" if v == "tie" else v.upper()


def combine_orders(ab: str | None, ba: str | None) -> tuple[str, bool | None]:
    """The candidate's outcome (``win``, ``loss``, ``tie``, ``unparsable``) and whether the two
    orders agreed (None when unparsable). ``ab``: verdict with the candidate as A; ``ba``: with
    the candidate as B."""
    if ab is None or ba is None:
        return "unparsable", None
    first = {"A": "win", "B": "loss", "tie": "tie"}[ab]
    second = {"B": "win", "A": "loss", "tie": "tie"}[ba]
    return (first, True) if first == second else ("tie", False)


def pointwise_summary(scores: list[float | None], scale: Scale, n_boot: int = 1000, seed: int = 0) -> dict:
    """``score`` (1-10) or ``pass_rate`` over parsed verdicts, and ``unparsable_rate``; each
    ``{"value", "ci_low", "ci_high", "n"}``."""
    parsed = [s for s in scores if s is not None]
    name = "pass_rate" if scale == "pass_fail" else "score"
    return {
        name: mean_with_ci(parsed, n_boot, seed),
        "unparsable_rate": mean_with_ci([float(s is None) for s in scores], n_boot, seed),
    }


def pairwise_summary(outcomes: list[tuple[str, bool | None]], n_boot: int = 1000, seed: int = 0) -> dict:
    """``win_rate``, ``wins``, ``ties``, ``losses``, ``position_consistency`` over parsed pairs and
    ``unparsable_rate`` over all (module docstring)."""
    parsed = [(o, c) for o, c in outcomes if o != "unparsable"]
    value = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    return {
        "win_rate": mean_with_ci([value[o] for o, _ in parsed], n_boot, seed),
        "wins": mean_with_ci([float(o == "win") for o, _ in parsed], n_boot, seed),
        "ties": mean_with_ci([float(o == "tie") for o, _ in parsed], n_boot, seed),
        "losses": mean_with_ci([float(o == "loss") for o, _ in parsed], n_boot, seed),
        "position_consistency": mean_with_ci([float(bool(c)) for _, c in parsed], n_boot, seed),
        "unparsable_rate": mean_with_ci([float(o == "unparsable") for o, _ in outcomes], n_boot, seed),
    }


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def judge_pointwise(
    generate: Any, prompts: list, responses: list[str], cfg: JudgeConfig, n_boot: int = 1000, seed: int = 0
) -> tuple[dict, list[dict]]:
    """``(metrics, rows)``: one verdict per response; rows keep the judge's text and parsed score."""
    rubric = cfg.rubric or DEFAULT_CONSTITUTION
    chats = [_user(POINTWISE_TEMPLATE.format(rubric=rubric, prompt=prompt_text(p), response=r[: cfg.max_chars],
                                             last_line=LAST_LINE[cfg.scale]))
             for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
    verdicts = _ask(generate, chats)
    scores = [parse_pointwise(v, cfg.scale) for v in verdicts]
    rows = [{"score": s, "verdict": v[:1000]} for s, v in zip(scores, verdicts, strict=True)]
    return pointwise_summary(scores, cfg.scale, n_boot, seed), rows


def judge_pairwise(
    generate: Any,
    prompts: list,
    candidate: list[str],
    baseline: list[str],
    cfg: JudgeConfig,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """``(metrics, rows)``: every pair judged in both orders (module docstring), one batch."""
    rubric = cfg.rubric or DEFAULT_CONSTITUTION
    cut = cfg.max_chars

    def chat(p: Any, a: str, b: str) -> list[dict]:
        return _user(PAIRWISE_TEMPLATE.format(rubric=rubric, prompt=prompt_text(p), a=a[:cut], b=b[:cut]))

    pairs = list(zip(prompts, candidate, baseline, strict=True))
    chats = [chat(p, x, y) for p, x, y in pairs] + [chat(p, y, x) for p, x, y in pairs]
    verdicts = _ask(generate, chats)
    ab, ba = verdicts[: len(pairs)], verdicts[len(pairs) :]
    outcomes = [combine_orders(parse_pairwise(u), parse_pairwise(v)) for u, v in zip(ab, ba, strict=True)]
    rows = [{"outcome": o, "consistent": c, "verdict_ab": u[:1000], "verdict_ba": v[:1000]}
            for (o, c), u, v in zip(outcomes, ab, ba, strict=True)]  # fmt: skip
    return pairwise_summary(outcomes, n_boot, seed), rows


def _ask(generate: Any, chats: list[list[dict]]) -> list[str]:
    from posttrain.errors import DataError

    verdicts = list(generate(chats)) if chats else []
    if len(verdicts) != len(chats):
        raise DataError(f"the judge returned {len(verdicts)} verdicts for {len(chats)} prompts")
    return verdicts


def make_generate(cfg: JudgeConfig) -> Any:
    """The judge's ``generate``: the endpoint when set, else the local model folder."""
    from posttrain.eval.judge_backends import local_generate, openai_generate

    if cfg.endpoint:
        return openai_generate(cfg.endpoint, cfg.endpoint_model, cfg.max_new_tokens, cfg.timeout_s,
                               cfg.retries, cfg.concurrency, cfg.api_key_env)  # fmt: skip
    return local_generate(cfg.model, cfg.max_new_tokens, precision=cfg.precision)


def baseline_responses(path: str, label: str) -> dict[str, str]:
    """Question -> first sample of another eval run's results.json (its decoding ``label`` if it
    has one, else its first decoding)."""
    import json
    from pathlib import Path

    from posttrain.errors import DataError

    try:
        problems = json.loads(Path(path).read_text(encoding="utf-8"))["problems"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read a results.json here: {exc}", where=path,
                        fix="point judge.baseline at the results.json of a `posttrain eval` run") from None  # fmt: skip
    out = {}
    for p in problems:
        decs = p.get("decodings") or {}
        run = decs.get(label) or next(iter(decs.values()), None)
        if run and run.get("samples"):
            out[p["question"]] = run["samples"][0]["text"]
    return out


def run_judge(cfg: JudgeConfig, state: Any, labels: list[str], n_boot: int, seed: int) -> tuple[dict, list]:
    """Judge the candidate decoding's first sample of every finished problem (pairwise: against the
    baseline's response to the same question; problems the baseline lacks are left out).
    Returns ``(metrics, rows)``, rows with the problem's index, where, question and responses."""
    label = cfg.candidate or labels[0]
    done = state.done.get(label, {})
    idx = sorted(done)
    if cfg.mode == "pairwise":
        if cfg.baseline in labels:
            other = state.done.get(cfg.baseline, {})
            base = {state.items[i].question: other[i].samples[0]["text"] for i in other}
        else:
            base = baseline_responses(cfg.baseline, label)
        idx = [i for i in idx if state.items[i].question in base]
    items = [state.items[i] for i in idx]
    responses = [done[i].samples[0]["text"] for i in idx]
    generate = make_generate(cfg)
    rows = [{"index": i, "where": it.where, "question": it.question, "candidate": r}
            for i, it, r in zip(idx, items, responses, strict=True)]  # fmt: skip
    if cfg.mode == "pointwise":
        metrics, verdicts = judge_pointwise(
            generate, [it.prompt for it in items], responses, cfg, n_boot, seed
        )
    else:
        baseline = [base[it.question] for it in items]
        for row, b in zip(rows, baseline, strict=True):
            row["baseline"] = b
        metrics, verdicts = judge_pairwise(generate, [it.prompt for it in items], responses, baseline, cfg,
                                           n_boot, seed)  # fmt: skip
    return metrics, [{**r, **v} for r, v in zip(rows, verdicts, strict=True)]
