"""Chat-template engineering: lint a tokenizer's template, add single-token tags, export per-turn samples.

Three tools, all derived by rendering with the tokenizer's own template (no per-family rules):

- `lint_template`: how the think tags and the step separator tokenise, the generation prompt,
  whether the end-of-turn token is emitted and trained, prefix preservation on a probe
  conversation with reasoning, and ``enable_thinking``-style switches; a verdict with fixes.
- `add_tokens`: add tags as single (added) tokens, resize the embeddings and initialise the
  new rows to the mean of the existing ones.
- `per_turn_examples`: one template-faithful ``prompt`` / ``completion`` pair per assistant
  turn, built on `posttrain.data.render`'s turn rendering (the same code SFT uses).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from posttrain.data.render import (
    IGNORE_INDEX,
    _encode_many,
    _history_rewritten,
    _render_turn,
    _Turn,
    end_of_turn,
    render_chat,
    special_ids,
)
from posttrain.errors import DataError, ModelError

THINK_TAGS = ("<think>", "</think>")
STEP_SEP = "<step>"


# --------------------------------------------------------------------------- per-turn export


def check_think_closed(messages: list[dict], where: str = "", tags: tuple[str, str] = THINK_TAGS) -> None:
    """Raise DataError if an assistant ``content`` opens a think tag it never closes.

    Scans the tags left to right: every ``<think>`` must be followed by ``</think>`` before
    the next ``<think>`` or the end. (A lone ``</think>`` is allowed: templates such as
    DeepSeek-R1's pre-fill ``<think>\\n`` in the generation prompt.)
    """
    opener, closer = tags
    pattern = re.compile(f"{re.escape(opener)}|{re.escape(closer)}")
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant" or not isinstance(msg.get("content"), str):
            continue
        open_ = False
        for m in pattern.finditer(msg["content"]):
            if m.group() == opener and open_:
                break
            open_ = m.group() == opener
        if open_:
            raise DataError(
                f"messages[{i}].content: {opener} is never closed by {closer}",
                where=where or None,
                fix=f"close the reasoning with {closer} (a truncated generation should be dropped or "
                "re-generated), or move it to reasoning_content",
            )


def template_turns(
    tokenizer: Any,
    messages: list[dict],
    where: str = "",
    tools: list[dict] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[_Turn]:
    """The rendered assistant turns of a conversation (render.py's `_render_turn` for each).

    Raises DataError for a conversation the template rejects (with the template's own rule),
    an unclosed ``<think>``, or one without an assistant turn; ModelError without a template.
    """
    require_chat_template(tokenizer, where)
    check_think_closed(messages, where)
    kw = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
    targets = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not targets:
        raise DataError(
            "no assistant turn", where=where or None, fix="add the assistant reply, or drop the row"
        )
    eot = end_of_turn(tokenizer)
    return [_render_turn(tokenizer, messages, t, eot, where, **kw) for t in targets]


def turn_ids(tokenizer: Any, turns: list[_Turn]) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, completion_ids)`` per turn; eos is appended when the template closed no turn.

    Prompt and completion are tokenised separately, as render.py does, so the prompt ids
    equal ``apply_chat_template(messages[:t], add_generation_prompt=True)``.
    """
    encoded = _encode_many(tokenizer, [text for turn in turns for text in (turn.prompt, turn.trained)])
    out = []
    for k, turn in enumerate(turns):
        completion = encoded[2 * k + 1] + ([tokenizer.eos_token_id] if turn.needs_eos else [])
        out.append((encoded[2 * k], completion))
    return out


def per_turn_examples(
    tokenizer: Any,
    messages: list[dict],
    where: str = "",
    tools: list[dict] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[dict]:
    """One dict per assistant turn: ``prompt``, ``completion`` (strings), ``prompt_ids``, ``completion_ids``.

    ``prompt`` is exactly what the template renders at inference time for that turn
    (``messages[:t]`` with the generation prompt); ``completion`` is the rest of
    ``render(messages[:t + 1])`` up to and including the end-of-turn marker. Also ``turn``
    (the message index) and ``where``.
    """
    turns = template_turns(tokenizer, messages, where, tools, template_kwargs)
    rows = []
    for turn, (p_ids, c_ids) in zip(turns, turn_ids(tokenizer, turns), strict=True):
        completion = turn.trained + (tokenizer.eos_token if turn.needs_eos else "")
        rows.append(
            {
                "prompt": turn.prompt,
                "completion": completion,
                "prompt_ids": p_ids,
                "completion_ids": c_ids,
                "turn": turn.index,
                "where": where,
            }
        )
    return rows


def require_chat_template(tokenizer: Any, where: str = "") -> None:
    """ModelError if the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the tokenizer has no chat template",
            where=where or getattr(tokenizer, "name_or_path", None) or None,
            fix="use an instruct model's tokenizer, or set tokenizer.chat_template (a jinja string) "
            "and save it with tokenizer.save_pretrained",
        )


# --------------------------------------------------------------------------- lint


@dataclass
class TagInfo:
    """How one tag tokenises: alone, and inside text (``x<tag>\\n``)."""

    tag: str
    n_tokens: int
    pieces: list[str]
    kind: str  # "special", "added", "vocab" (one ordinary vocabulary entry) or "split"
    single_in_context: bool  # the tag's id survives when the tag sits between other text

    @property
    def single(self) -> bool:
        return self.n_tokens == 1 and self.single_in_context


@dataclass
class LintReport:
    """What `lint_template` found; ``warnings`` pair each problem with a concrete fix."""

    tags: list[TagInfo]
    generation_prompt: str | None
    end_of_turn: str | None
    eot_is_eos: bool
    eot_trained: bool | None
    prefix_preserving: bool | None
    prefix_note: str
    switches: dict[str, bool]  # template variable -> does it change the rendering
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "ok" if not self.warnings else "warnings"

    def to_dict(self) -> dict:
        out = asdict(self)
        for tag, info in zip(out["tags"], self.tags, strict=True):
            tag["single"] = info.single
        out["warnings"] = [{"problem": p, "fix": f} for p, f in self.warnings]
        out["verdict"] = self.verdict
        return out

    def format(self) -> str:
        """A short human-readable report."""
        lines = ["tags:"]
        for t in self.tags:
            state = "single token" if t.single else f"SPLIT into {t.n_tokens}: {t.pieces}"
            lines.append(f"  {t.tag!r:<12} {t.kind:<8} {state}")
        lines.append(f"generation prompt: {self.generation_prompt!r}")
        trained = {True: "trained", False: "NOT trained", None: "unknown"}[self.eot_trained]
        eos = "is eos" if self.eot_is_eos else "is not eos"
        lines.append(f"end of turn: {self.end_of_turn!r} ({trained}, {eos})")
        lines.append(f"prefix-preserving: {self.prefix_preserving} ({self.prefix_note})")
        switches = ", ".join(
            f"{k} ({'changes rendering' if v else 'no effect'})" for k, v in self.switches.items()
        )
        lines.append(f"thinking switches: {switches or 'none'}")
        lines.append(f"verdict: {self.verdict}")
        lines += [f"  - {p}\n    fix: {f}" for p, f in self.warnings]
        return "\n".join(lines)


def tag_info(tokenizer: Any, tag: str) -> TagInfo:
    """Tokenise ``tag`` alone and inside text; classify it as special, added, vocab or split."""
    ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = {tok.content: tok for tok in tokenizer.added_tokens_decoder.values()}
    if len(ids) != 1:
        kind = "split"
    elif tag in added:
        kind = "special" if added[tag].special or ids[0] in special_ids(tokenizer) else "added"
    else:
        kind = "vocab"
    in_context = tokenizer(f"x{tag}\n", add_special_tokens=False)["input_ids"]
    return TagInfo(tag, len(ids), pieces, kind, len(ids) == 1 and ids[0] in in_context)


_PROBE_USER = {"role": "user", "content": "PROBE_QUESTION"}


def _probe_conversations() -> list[list[dict]]:
    """Two user/assistant exchanges with reasoning: inline in content, and as reasoning_content."""
    inline = [
        {"role": "system", "content": "PROBE_SYSTEM"},
        _PROBE_USER,
        {"role": "assistant", "content": "<think>\nPROBE_THOUGHT_A\n</think>\n\nPROBE_ANSWER_A"},
        {"role": "user", "content": "PROBE_FOLLOWUP"},
        {"role": "assistant", "content": "<think>\nPROBE_THOUGHT_B\n</think>\n\nPROBE_ANSWER_B"},
    ]
    separate = [
        {**m, "content": m["content"].split("\n\n")[-1], "reasoning_content": m["content"].split("\n")[1]}
        if m["role"] == "assistant"
        else m
        for m in inline
    ]
    return [inline, separate]


def generation_prompt(tokenizer: Any, **kw: Any) -> str:
    """What ``add_generation_prompt=True`` appends to a rendered user message."""
    bare = tokenizer.apply_chat_template([_PROBE_USER], tokenize=False, **kw)
    gen = tokenizer.apply_chat_template([_PROBE_USER], tokenize=False, add_generation_prompt=True, **kw)
    return gen[len(bare) :] if gen.startswith(bare) else gen


def _safe_generation_prompt(tokenizer: Any) -> str | None:
    try:
        return generation_prompt(tokenizer)
    except Exception:  # jinja TemplateError or raise_exception: reported as unknown
        return None


def _prefix_check(tokenizer: Any) -> tuple[bool | None, str]:
    """Prefix preservation on the probe conversations; None with the reason if the template rejects them."""
    notes = []
    for conv in _probe_conversations():
        try:
            turns = [_render_turn(tokenizer, conv, t, end_of_turn(tokenizer), "probe") for t in (2, 4)]
        except DataError as err:
            notes.append(err.message)
            continue
        if _history_rewritten(turns):
            return False, "the template rewrites earlier turns (e.g. strips <think>): one sample per turn"
    if len(notes) == 2:
        return None, f"the probe conversation could not be rendered: {notes[0]}"
    return True, "history is never rewritten: one sample per conversation"


def _eot_trained(tokenizer: Any, eot: str | None) -> bool | None:
    """Whether render_chat trains the template's end-of-turn token (or the appended eos)."""
    stop = eot if eot is not None else tokenizer.eos_token
    stop_ids = tokenizer(stop or "", add_special_tokens=False)["input_ids"]
    sample = None
    # Inline reasoning first: templates that pre-fill `<think>\n` reject a reply without it.
    for reply in ("<think>\nPROBE_THOUGHT\n</think>\n\nPROBE_REPLY", "PROBE_REPLY"):
        try:
            sample = render_chat(tokenizer, [_PROBE_USER, {"role": "assistant", "content": reply}])[-1]
            break
        except DataError:
            continue
    if sample is None:
        return None
    trained = [i for i, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE_INDEX]
    return bool(stop_ids) and trained[-len(stop_ids) :] == stop_ids


_SWITCH_NAME = re.compile(r"think|reason", re.IGNORECASE)


def thinking_switches(tokenizer: Any) -> dict[str, bool]:
    """Template variables named like ``enable_thinking`` -> whether True/False render differently.

    Candidates are the template's undeclared jinja variables whose name contains ``think`` or
    ``reason``, minus names the template assigns (``{% set reasoning = ... %}``) and message
    fields (``reasoning_content``); each is rendered
    on a one-message probe with the generation prompt, set to True and to False.
    """
    import jinja2
    from jinja2 import meta

    source = tokenizer.chat_template
    source = source.get("default", "") if isinstance(source, dict) else source
    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
        names = meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateSyntaxError:  # e.g. custom tags: fall back to a plain scan
        names = set(re.findall(r"\b[a-z_]*(?:think|reason)[a-z_]*\b", source))
    assigned = set(re.findall(r"\{%-?\s*set\s+(\w+)", source))  # template locals, not switches
    out = {}
    for name in sorted(n for n in names - assigned if _SWITCH_NAME.search(n) and not n.endswith("_content")):
        try:
            on, off = (generation_prompt(tokenizer, **{name: v}) for v in (True, False))
        except Exception:  # a template may expect another type (e.g. reasoning_effort="high")
            on = off = ""
        out[name] = on != off
    return out


def _tag_warnings(tags: list[TagInfo], model_hint: str) -> list[tuple[str, str]]:
    split = [t for t in tags if not t.single]
    if not split:
        return []
    problems = "; ".join(
        f"{t.tag} takes {t.n_tokens} tokens {t.pieces}"
        if t.n_tokens > 1
        else f"{t.tag} merges with neighbouring text"
        for t in split
    )
    problem = (
        f"{problems}: a model that must emit a multi-token tag produces broken variants "
        "(e.g. `<think`, `< think>`) that parsers and rewards miss"
    )
    tokens = ",".join(t.tag for t in split)
    fix = f"run `posttrain templates add-tokens {model_hint} OUT --tokens '{tokens}'` before SFT"
    return [(problem, fix)]


def _other_warnings(report: LintReport, tokenizer: Any) -> list[tuple[str, str]]:
    out = []
    if report.end_of_turn is None:
        out.append(
            (
                "the template closes assistant turns without a special token",
                f"nothing to do for SFT (eos {tokenizer.eos_token!r} is appended and trained), but "
                "generation stops only on eos: keep eos_token_id in generation_config.json",
            )
        )
    elif not report.eot_is_eos:
        out.append(
            (
                f"the end-of-turn token {report.end_of_turn!r} is not eos_token ({tokenizer.eos_token!r})",
                "list its id in generation_config.json eos_token_id so generation stops after a turn",
            )
        )
    if report.eot_trained is False:
        out.append(("the end-of-turn token would not be trained", "check the template's end-of-turn marker"))
    if report.generation_prompt is None:
        out.append(
            (
                "the template rejects a single user message",
                "check the template renders [user] with add_generation_prompt",
            )
        )
    if report.prefix_preserving is None:
        out.append((report.prefix_note, "check the template renders system/user/assistant turns"))
    return out


def lint_template(
    tokenizer: Any,
    think_tags: tuple[str, ...] = THINK_TAGS,
    step_sep: str | None = STEP_SEP,
    model_hint: str = "MODEL",
) -> LintReport:
    """Lint a tokenizer's chat template; ``model_hint`` is the model path used in suggested commands."""
    require_chat_template(tokenizer)
    tags = [tag_info(tokenizer, t) for t in (*think_tags, *([step_sep] if step_sep else []))]
    eot = end_of_turn(tokenizer)
    eot_ids = tokenizer(eot, add_special_tokens=False)["input_ids"] if eot else []
    prefix, note = _prefix_check(tokenizer)
    report = LintReport(
        tags=tags,
        generation_prompt=_safe_generation_prompt(tokenizer),
        end_of_turn=eot,
        eot_is_eos=tokenizer.eos_token_id is not None and tokenizer.eos_token_id in eot_ids,
        eot_trained=_eot_trained(tokenizer, eot),
        prefix_preserving=prefix,
        prefix_note=note,
        switches=thinking_switches(tokenizer),
    )
    report.warnings = _tag_warnings(tags, model_hint) + _other_warnings(report, tokenizer)
    return report


# --------------------------------------------------------------------------- add tokens


def add_tokens(
    model: Any, tokenizer: Any, tokens: list[str], special: bool = False
) -> tuple[Any, Any, list[str]]:
    """Add ``tokens`` as single added tokens and give each a new embedding row.

    Tokens already in the vocabulary are skipped. Embeddings are resized to fit the new ids
    (never shrunk); every new row of the input embeddings (and of the output embeddings and
    their bias when untied) is set to the mean of the rows of the existing tokens
    ``[0, len(tokenizer) before)``, so a new tag starts as an "average" token rather than noise.
    Returns ``(model, tokenizer, added)`` (both modified in place).
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t and t not in vocab]
    if not new:
        return model, tokenizer, []
    n_old = len(tokenizer)
    tokenizer.add_tokens(
        [AddedToken(t, special=special, normalized=False) for t in new], special_tokens=special
    )
    new_ids = tokenizer.convert_tokens_to_ids(new)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _init_rows(model, n_old, new_ids)
    return model, tokenizer, new


def _init_rows(model: Any, n_old: int, new_ids: list[int]) -> None:
    import torch

    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    with torch.no_grad():
        inp.weight[new_ids] = inp.weight[:n_old].mean(dim=0)
        if out is not None and out.weight.data_ptr() != inp.weight.data_ptr():
            out.weight[new_ids] = out.weight[:n_old].mean(dim=0)
        if out is not None and getattr(out, "bias", None) is not None:
            out.bias[new_ids] = out.bias[:n_old].mean()
