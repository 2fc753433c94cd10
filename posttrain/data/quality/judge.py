"""Judge checklist: a judge model flags label noise, off-topic answers and fake reasoning (step 9).

Each enabled check is one pass/fail question to the judge about a record's request and
response, asked with the evaluation judge's pointwise prompt (`posttrain.eval.judge`,
``POINTWISE_TEMPLATE``, scale ``pass_fail``: the reply ends ``Verdict: PASS`` or ``Verdict:
FAIL``, read by `parse_pointwise`) and the check's rubric as the rubric:

- ``label_noise``: the response's final answer is correct for the request;
- ``off_topic``: the response answers this request;
- ``fake_reasoning``: the reasoning is valid and leads to the stated answer (a right answer
  after wrong steps fails); asked only of responses that show reasoning (a
  ``reasoning_content`` field or a ``<think>`` block).

A FAIL is a flag; a reply with no verdict is recorded as ``unparsable`` and is no flag. The
judge is a local model folder (``model``; ``default``: the embedded model) or an
OpenAI-compatible endpoint (``endpoint``), the backends of `posttrain.eval.judge_backends`.
With ``remove: false`` (the default) flagged records are kept and listed in ``flags.jsonl``;
with ``remove: true`` they are dropped under the rule ``judge``, the verdicts as evidence.

The response is the last assistant turn of a chat (the turns before it are the request), the
completion of a prompt/completion record, the chosen response of a preference record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from posttrain.data.quality.items import Item, chunks, message_text
from posttrain.errors import ConfigError, DataError

CHECKS = {
    "label_noise": "The final answer of the response is correct for the request. Judge only the "
    "final answer: FAIL if it is wrong, incomplete or missing.",
    "off_topic": "The response answers this request (the same question, task and subject). FAIL if "
    "it answers a different question or talks about something else.",
    "fake_reasoning": "Every step of the reasoning is correct and the steps lead to the stated "
    "final answer. FAIL if a step is wrong or the answer does not follow from the steps, even "
    "when the final answer is right.",
}
"""Check name -> the rubric the judge grades PASS / FAIL against."""

Generate = Callable[[list[list[dict]]], list[str]]


@dataclass
class JudgeChecklistConfig:
    """The judge checklist of `posttrain data clean` (off while neither model nor endpoint is set)."""

    model: str = ""
    """A local judge model folder (``default``: the embedded model)."""
    endpoint: str = ""
    """Or an OpenAI-compatible base URL (``http://127.0.0.1:8000/v1``); wins over ``model``."""
    endpoint_model: str = "judge"
    """The ``model`` field sent to the endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (sent only when set)."""
    checks: list[str] = field(default_factory=lambda: list(CHECKS))
    """Which checks to ask: label_noise, off_topic, fake_reasoning."""
    remove: bool = False
    """Drop flagged records (rule ``judge``); false: keep them and list them in flags.jsonl."""
    max_new_tokens: int = 64
    """The judge's generation budget per verdict."""
    max_chars: int = 4000
    """Requests and responses are cut to this many characters in the judge prompt."""
    batch_size: int = 64
    """Records whose checks go to the judge in one call."""
    timeout_s: float = 30.0
    """Per-request timeout of the endpoint."""
    retries: int = 2
    """Endpoint retries after a timeout, connection error, 429 or 5xx."""
    concurrency: int = 4
    """Endpoint requests in flight at once."""

    @property
    def enabled(self) -> bool:
        return bool(self.model or self.endpoint)

    def validate(self) -> None:
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown:
            raise ConfigError(f"unknown judge check {unknown[0]!r}", where="judge.checks",
                              fix=f"use some of {', '.join(CHECKS)}")  # fmt: skip
        if self.enabled and not self.checks:
            raise ConfigError(
                "judge.checks is empty", where="judge.checks", fix=f"list some of {', '.join(CHECKS)}"
            )
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(
                "judge.batch_size and judge.max_new_tokens must be >= 1", where="judge.batch_size"
            )


def request_response(item: Item) -> tuple[list[dict], dict]:
    """The request (messages) and the judged response (one message) of a record."""
    data, kind = item.data, item.kind
    if kind == "chat":
        last = max((i for i, m in enumerate(data["messages"]) if m["role"] == "assistant"), default=None)
        if last is not None:
            return data["messages"][:last], data["messages"][last]
    elif kind in ("prompt_completion", "preference"):
        turns = data["completion" if kind == "prompt_completion" else "chosen"]
        content = "\n".join(m["content"] for m in turns)
        reasoning = "\n".join(m["reasoning_content"] for m in turns if m.get("reasoning_content"))
        message = {"role": "assistant", "content": content}
        return data["prompt"], {**message, **({"reasoning_content": reasoning} if reasoning else {})}
    raise DataError(
        f"the judge checklist judges a response; this {kind} record has none",
        where=item.where,
        fix="judge chat (with an assistant turn), prompt/completion or preference records, or unset judge",
    )


def has_reasoning(message: dict) -> bool:
    return bool(message.get("reasoning_content")) or "<think>" in message["content"]


def check_prompts(item: Item, checks: list[str], max_chars: int) -> list[tuple[str, list[dict]]]:
    """``(check, judge chat)`` for every check that applies to the item."""
    from posttrain.eval.judge import LAST_LINE, POINTWISE_TEMPLATE
    from posttrain.rewards.judge import prompt_text

    request, response = request_response(item)
    text = message_text(response)[:max_chars]
    out = []
    for name in checks:
        if name == "fake_reasoning" and not has_reasoning(response):
            continue
        body = POINTWISE_TEMPLATE.format(rubric=CHECKS[name], prompt=prompt_text(request)[:max_chars],
                                         response=text, last_line=LAST_LINE["pass_fail"])  # fmt: skip
        out.append((name, [{"role": "user", "content": body}]))
    return out


def judge_generate(cfg: JudgeChecklistConfig) -> Generate:
    """The judge backend (`posttrain.eval.judge.make_generate`) for these settings."""
    from posttrain.eval.judge import JudgeConfig, make_generate

    return make_generate(JudgeConfig(
        mode="pointwise", model=cfg.model, endpoint=cfg.endpoint, endpoint_model=cfg.endpoint_model,
        api_key_env=cfg.api_key_env, max_new_tokens=cfg.max_new_tokens, timeout_s=cfg.timeout_s,
        retries=cfg.retries, concurrency=cfg.concurrency,
    ))  # fmt: skip


def verdicts_of(replies: dict[str, str]) -> dict:
    """``{"flags": [failed checks], "verdicts": {check: PASS|FAIL|unparsable}, "replies"}``."""
    from posttrain.eval.judge import parse_pointwise

    verdicts = {}
    for name, reply in replies.items():
        v = parse_pointwise(reply, "pass_fail")
        verdicts[name] = "unparsable" if v is None else ("PASS" if v else "FAIL")
    flags = [n for n, v in verdicts.items() if v == "FAIL"]
    return {"flags": flags, "verdicts": verdicts, "replies": {n: r[-300:] for n, r in replies.items()}}


def judge_checklist(
    items: Iterable[Item], cfg: JudgeChecklistConfig, generate: Generate | None = None
) -> Iterator[Item]:
    """Ask the judge every check of every live item, ``batch_size`` records per call; set
    ``item.flags`` (the `verdicts_of` dict) on flagged items, or drop them with ``remove``."""
    generate = judge_generate(cfg) if generate is None else generate
    tally: Counter = Counter()
    for group in chunks(items, cfg.batch_size):
        asks = [(it, name, chat) for it in group if it.removed is None
                for name, chat in check_prompts(it, cfg.checks, cfg.max_chars)]  # fmt: skip
        replies = list(generate([chat for _, _, chat in asks])) if asks else []
        if len(replies) != len(asks):
            raise DataError(f"the judge returned {len(replies)} verdicts for {len(asks)} prompts",
                            where="judge", fix="check the judge endpoint")  # fmt: skip
        per_item: dict[int, dict[str, str]] = {}
        for (it, name, _), reply in zip(asks, replies, strict=True):
            per_item.setdefault(id(it), {})[name] = reply
        for item in group:
            if item.removed is not None or id(item) not in per_item:
                continue
            found = verdicts_of(per_item[id(item)])
            tally.update(found["verdicts"].values())
            tally["records"] += 1
            tally["flagged"] += bool(found["flags"])
            if found["flags"] and cfg.remove:
                item.drop("judge", **found)
            elif found["flags"]:
                item.flags = found
        yield from group
    _print_tally(tally, cfg.remove)


def _print_tally(tally: Counter, remove: bool) -> None:
    """One console line: records judged, verdicts by kind, flagged (a judge that never answers
    PASS/FAIL flags nothing: the unparsable count says so)."""
    from rich.console import Console

    Console(stderr=True).print(
        f"judge checklist: {tally['records']} records, verdicts {tally['PASS']} PASS / {tally['FAIL']} FAIL / "
        f"{tally['unparsable']} unparsable; {tally['flagged']} flagged ({'removed' if remove else 'kept, in flags.jsonl'})"
    )
