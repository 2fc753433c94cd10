"""`posttrain data clean`: validate, filter, verify, dedup, decontaminate and mix, with a report.

`run_clean(recipe)` streams every input through the steps in this order, each optional:
validate (`read_source`), heuristic filters (`apply_filters`), answer verification
(`verify_answers`), exact dedup, near dedup (`exact_dedup`, `near_dedup`; across all inputs),
decontamination (`decontaminate`), the perplexity filter (`perplexity_filter`), the judge
checklist (`judge_checklist`; it runs before mixing's draw, so it also judges rows the draw
then leaves out), mixing (`mix`). It writes ``output_dir``:

- ``kept.jsonl``: the kept rows as read (the input's record format);
- ``removed.jsonl``: ``{"rule", "where", "evidence", "record"}`` for every dropped row;
- ``report.json``: ``{"input", "kept", "removed": {rule: count}}`` over all of `RULES`
  (with mixing, rows the draw left out are neither kept nor removed);
- ``flags.jsonl``: ``{"where", "flags", "verdicts", "replies", "record"}`` for every kept row
  the judge checklist flagged (``judge.remove: false``; empty otherwise);
- ``run.json``: the recipe and the inputs' sizes and mtimes; a rerun that finds the same
  returns at once.

The folder is built as ``OUT.tmp-<pid>`` and renamed into place, so a run that is killed or
fails never leaves a half-written ``OUT`` (an older complete one stays until the rename).
Memory is flat in the number of records apart from the exact-dedup hashes (one dict entry
a distinct record) and the near-dedup index (`NearDedupIndex`), and one float a record for a
perplexity percentile. ``engine: ray`` runs validation, the filters, normalisation, MinHash
signatures and decontamination as Ray Data operations (`posttrain.data.quality.ray_engine`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from posttrain.config import to_dict
from posttrain.data.quality.decontam import DecontamConfig, build_index, decontaminate
from posttrain.data.quality.dedup import DedupConfig, NearDedupIndex, exact_dedup, near_dedup
from posttrain.data.quality.filters import FilterConfig, add_token_counts, apply_filters, tokenizer_counter
from posttrain.data.quality.items import RULES, Item, chunks, read_source
from posttrain.data.quality.judge import JudgeChecklistConfig, judge_checklist
from posttrain.data.quality.mix import MixConfig, SourceConfig, budget_counts, mix, mix_mode, ratio_counts
from posttrain.data.quality.perplexity import PerplexityCleanConfig, perplexity_filter
from posttrain.data.quality.verify import VerifyConfig, verify_answers
from posttrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class CleanSteps:
    """The cleaning steps and their settings: shared by a clean recipe and a training recipe's
    ``clean:`` section (`posttrain.data.quality.section`)."""

    on_invalid: Literal["drop", "stop"] = "drop"
    """An invalid row is dropped (rule ``invalid``, with its file:line) or stops the run."""
    tokenizer: str | None = None
    """Model folder (or ``default``) whose tokenizer counts tokens for filters.min/max_tokens and budgets."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    perplexity: PerplexityCleanConfig = field(default_factory=PerplexityCleanConfig)
    judge: JudgeChecklistConfig = field(default_factory=JudgeChecklistConfig)
    engine: Literal["local", "ray"] = "local"
    """``local``: one process; ``ray``: validation, filters, MinHash signatures and
    decontamination as Ray Data operations (`posttrain.data.quality.ray_engine`)."""
    ray_address: str | None = None
    """Ray cluster to join with engine=ray (None: start a local one, or join the one running here)."""
    ray_workers: int | None = None
    """Ray Data actors doing the per-record work (None: one per CPU of the cluster)."""
    ray_batch_size: int = 1024
    """Records per Ray Data batch."""
    ray_window: int = 100_000
    """Rows per Ray Data pipeline (the rows the driver holds in flight)."""

    def validate_steps(self) -> None:
        if (
            self.ray_batch_size < 1
            or self.ray_window < 1
            or (self.ray_workers is not None and self.ray_workers < 1)
        ):
            raise ConfigError(
                "ray_workers, ray_batch_size and ray_window must be >= 1", where="ray_batch_size"
            )
        if self.filters.needs_tokens and not self.tokenizer:
            raise ConfigError(
                "filters.min/max_tokens need a tokenizer", where="tokenizer", fix="set tokenizer"
            )
        for part in (self.filters, self.verify, self.dedup, self.decontam, self.perplexity, self.judge):
            part.validate()


@dataclass
class CleanRecipe(CleanSteps):
    """`posttrain data clean RECIPE.yaml`: every key of a clean recipe."""

    inputs: list[SourceConfig | str] = field(default_factory=list)
    """Input files (a path, or {path, kind, split, ratio, tokens}); all of one record kind."""
    output_dir: str = "runs/clean"
    """Output folder: kept.jsonl, removed.jsonl, flags.jsonl, report.json, run.json."""
    mix: MixConfig = field(default_factory=MixConfig)

    def sources(self) -> list[SourceConfig]:
        return [SourceConfig(path=s) if isinstance(s, str) else s for s in self.inputs]

    def validate(self) -> None:
        sources = self.sources()
        if not sources:
            raise ConfigError("no inputs", where="inputs", fix="list the data files to clean under inputs:")
        paths = [str(Path(s.path).resolve()) for s in sources]
        for i, s in enumerate(sources):
            if not s.path:
                raise ConfigError(f"inputs[{i}] has no path", where=f"inputs[{i}].path")
            if paths.index(paths[i]) != i:
                raise ConfigError(f"{s.path} is listed twice", where=f"inputs[{i}].path")
        if mix_mode(sources) == "tokens" and not self.tokenizer:
            raise ConfigError(
                "token budgets need a tokenizer", where="tokenizer", fix="set tokenizer (e.g. default)"
            )
        self.validate_steps()


def _steps(recipe: CleanRecipe, items: Iterable[Item], count_tokens) -> Iterator[Item]:
    """The cleaning steps, in the issue's order, as one chain of generators."""
    return _dedup_steps(recipe, record_steps(recipe, items, count_tokens))


def record_steps(recipe: CleanSteps, items: Iterable[Item], count_tokens, detect=None) -> Iterator[Item]:
    """The steps that look at one record at a time: heuristic filters, answer verification."""
    items = apply_filters(items, recipe.filters, count_tokens, detect)
    if recipe.verify.answers or recipe.verify.chain:
        items = verify_answers(items, recipe.verify)
    return iter(items)


def _dedup_steps(recipe: CleanRecipe, items: Iterable[Item]) -> Iterator[Item]:
    """Exact and near dedup (across all inputs, in order), decontamination, then the model steps."""
    index = build_index(recipe.decontam) if recipe.decontam.evals else None
    if recipe.dedup.exact:
        items = exact_dedup(items)
    if recipe.dedup.near:
        items = near_dedup(items, recipe.dedup, NearDedupIndex(recipe.dedup))
    if index is not None:
        items = decontaminate(items, index)
    return _model_steps(recipe, items)


def _model_steps(recipe: CleanRecipe, items: Iterable[Item]) -> Iterator[Item]:
    """The steps that ask a model: perplexity filter, judge checklist."""
    if recipe.perplexity.enabled:
        items = perplexity_filter(items, recipe.perplexity)
    if recipe.judge.enabled:
        items = judge_checklist(items, recipe.judge)
    return iter(items)


def _with_tokens(items: Iterable[Item], count_tokens) -> Iterator[Item]:
    for batch in chunks(items, 256):
        add_token_counts([it for it in batch if it.removed is None], count_tokens)
        yield from batch


def _line(row: object) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def _sink(
    items: Iterable[Item], tmp: Path, n_sources: int, split: bool
) -> tuple[Counter, list[int], list[int]]:
    """Write removed.jsonl and the kept rows (kept.jsonl, or one part file per source when mixing)."""
    counts: Counter = Counter()
    kept, tokens = [0] * n_sources, [0] * n_sources
    kinds: dict[str, int] = {}
    names = [f"part-{i}.jsonl" for i in range(n_sources)] if split else ["kept.jsonl"]
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(open(tmp / n, "w", encoding="utf-8")) for n in names]
        removed = stack.enter_context(open(tmp / "removed.jsonl", "w", encoding="utf-8"))
        flags = stack.enter_context(open(tmp / "flags.jsonl", "w", encoding="utf-8"))
        for item in items:
            counts["input"] += 1
            if item.removed is not None:
                counts[item.removed.rule] += 1
                rec = {"rule": item.removed.rule, "where": item.where, "evidence": item.removed.evidence}
                removed.write(_line({**rec, "record": item.raw}))
                continue
            if kinds and item.kind not in kinds:
                ((kind, source),) = kinds.items()
                raise DataError(
                    f"inputs[{item.source}] holds {item.kind} records but inputs[{source}] holds {kind} "
                    "records; kept.jsonl holds one kind (different record kinds)",
                    where=item.where,
                    fix="clean each record kind with its own recipe",
                )
            kinds.setdefault(item.kind, item.source)
            if item.flags:
                counts["flagged"] += 1
                flags.write(_line({"where": item.where, **item.flags, "record": item.raw}))
            outs[item.source if split else 0].write(_line(item.raw))
            kept[item.source] += 1
            tokens[item.source] += item.n_tokens or 0
    return counts, kept, tokens


def _write_mix(recipe: CleanRecipe, tmp: Path, mode: str, kept: list[int], tokens: list[int]) -> int:
    sources = recipe.sources()
    if mode == "ratio":
        counts = ratio_counts(kept, [s.ratio for s in sources], recipe.mix.total)
    else:
        counts = budget_counts(kept, tokens, [s.tokens for s in sources])
    parts = [tmp / f"part-{i}.jsonl" for i in range(len(sources))]
    with contextlib.ExitStack() as stack:
        streams = [stack.enter_context(open(p, encoding="utf-8")) for p in parts]
        with open(tmp / "kept.jsonl", "w", encoding="utf-8") as out:
            out.writelines(mix(streams, kept, counts, recipe.mix.seed))
    for p in parts:
        p.unlink()
    return sum(counts)


def _clean_into(recipe: CleanRecipe, tmp: Path) -> dict:
    sources = recipe.sources()
    mode = mix_mode(sources)
    count_tokens = None
    if recipe.tokenizer and (recipe.filters.needs_tokens or mode == "tokens"):
        count_tokens = tokenizer_counter(recipe.tokenizer)
    streams = (
        read_source(
            s.path,
            source=i,
            kind=s.kind,
            split=s.split,
            on_invalid=recipe.on_invalid,
            n_per_level=s.n_per_level,
            seed=s.seed,
        )
        for i, s in enumerate(sources)
    )
    if recipe.engine == "ray":
        from posttrain.data.quality.ray_engine import ray_items

        items = _dedup_steps(recipe, ray_items(recipe))
    else:
        items = _steps(recipe, itertools.chain.from_iterable(streams), count_tokens)
    if mode == "tokens":
        items = _with_tokens(items, count_tokens)
    counts, kept, tokens = _sink(items, tmp, len(sources), split=mode is not None)
    n_kept = _write_mix(recipe, tmp, mode, kept, tokens) if mode else sum(kept)
    return {"input": counts["input"], "kept": n_kept, "removed": {rule: counts[rule] for rule in RULES}}


def _fingerprint(recipe: CleanRecipe) -> dict:
    inputs = []
    for s in recipe.sources():
        st = Path(s.path).stat() if Path(s.path).exists() else None
        inputs.append([s.path, st.st_size if st else None, st.st_mtime_ns if st else None])
    return {"recipe": to_dict(recipe), "inputs": inputs}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(out: Path) -> None:
    """Remove ``OUT.tmp-<pid>`` folders left by runs that were killed (their pid is gone)."""
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an older ``out`` is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_clean(recipe: CleanRecipe) -> Path:
    """Clean the inputs into ``recipe.output_dir`` (atomically) and return that folder."""
    recipe.validate()
    out = Path(recipe.output_dir)
    fingerprint = _fingerprint(recipe)
    done = out / "run.json"
    if done.is_file() and (out / "report.json").is_file() and json.loads(done.read_text()) == fingerprint:
        log.info("%s is up to date with this recipe and its inputs; nothing to do", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = _clean_into(recipe, tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "run.json").write_text(json.dumps(fingerprint, indent=1) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print_report(report, out)
    return out


def report_table(report: dict, title: str = "posttrain data clean", flagged: int = 0):
    """The report as a rich table: input, each rule that removed something, kept."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("records")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    total = max(report["input"], 1)
    table.add_row("input", str(report["input"]), "100.0%")
    for rule, n in report["removed"].items():
        if n:
            table.add_row(f"removed: {rule}", str(n), f"{100 * n / total:.1f}%")
    table.add_row("kept", str(report["kept"]), f"{100 * report['kept'] / total:.1f}%")
    if flagged:
        table.add_row("kept, flagged by the judge", str(flagged), f"{100 * flagged / total:.1f}%")
    return table


def print_report(report: dict, out: Path) -> None:
    from rich.console import Console

    flags = out / "flags.jsonl"
    flagged = flags.read_text(encoding="utf-8").count("\n") if flags.is_file() else 0
    Console().print(report_table(report, title=f"posttrain data clean -> {out}", flagged=flagged))


def clean_main(recipe_path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """`run_clean` of the recipe at ``recipe_path`` with dotted ``overrides``."""
    from posttrain.config import load_recipe

    return run_clean(load_recipe(CleanRecipe, recipe_path, list(overrides)))


def clean_command(
    args: list[str],
    decontaminate_with: list[str] | None = None,
    near_dup_threshold: float | None = None,
    no_near_dup: bool = False,
) -> Path:
    """The CLI: ``RECIPE.yaml [key=value ...]`` or ``IN [IN ...] OUT [key=value ...]``, plus the options."""
    from posttrain.config import apply_override, from_dict, load_recipe

    overrides = [a for a in args if "=" in a]
    paths = [a for a in args if "=" not in a]
    if near_dup_threshold is not None:
        overrides.append(f"dedup.threshold={near_dup_threshold}")
    if no_near_dup:
        overrides.append("dedup.near=false")
    if len(paths) == 1 and paths[0].endswith((".yaml", ".yml")):
        recipe = load_recipe(CleanRecipe, paths[0], overrides)
    elif len(paths) >= 2:
        raw: dict = {"inputs": paths[:-1], "output_dir": paths[-1]}
        for item in overrides:
            apply_override(raw, item)
        recipe = from_dict(CleanRecipe, raw, source="command line")
    else:
        raise ConfigError(
            "expected RECIPE.yaml, or input files and an output folder",
            where="posttrain data clean",
            fix="posttrain data clean recipes/clean_tiny.yaml, or posttrain data clean in.jsonl out/",
        )
    recipe.decontam.evals = [*recipe.decontam.evals, *(decontaminate_with or [])]
    return run_clean(recipe)
