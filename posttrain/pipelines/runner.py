"""Multi-stage pipelines: ``posttrain run PIPELINE.yaml [stages.NAME.key=value ...]``.

A pipeline is an ordered list of stages. Each names a ``command`` (see
`posttrain.pipelines.commands.COMMANDS`), a ``recipe`` (a recipe file or an inline mapping) and
``overrides`` (dotted keys laid over the recipe). Override values, and values anywhere in an
inline recipe, may reference earlier stages' outputs: ``model.path: ${sft.final}``.

Every stage writes to ``OUTPUT_DIR/NAME`` unless its overrides set ``output_dir``. Stages resume:
``OUTPUT_DIR/pipeline_state.json`` records each stage's fingerprint, the hash of its resolved
recipe and of every upstream output it references. On a rerun a stage is

- **skipped** when it finished with the same fingerprint and its output is unchanged on disk;
- **resumed** when it started with the same fingerprint and did not finish (the trainers resume
  from their last complete checkpoint, so a killed run ends bit-identical to an uninterrupted one);
- **rerun from scratch** otherwise (its recipe or an upstream output changed). The old output
  folder is moved aside to ``NAME.stale-K``, never deleted, and every stage after it whose input
  changed reruns in turn.

After each stage that produces a model, the model is graded on the task suite's held-out split
(the ``eval`` section), giving one accuracy table with a column per stage (`report.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import from_dict, load_recipe, to_dict
from posttrain.errors import ConfigError, PosttrainError
from posttrain.pipelines.commands import COMMANDS, CommandSpec, get_command, stage_outputs

REF = re.compile(r"\$\{([^{}.]+)\.([^{}]+)\}")
"""A reference to an earlier stage's output: ``${stage.key}``."""
NAME = re.compile(r"^[A-Za-z_][\w-]*$")


@dataclass
class EqualComputeConfig:
    """Give this stage as much training time as another stage took (an equal-compute control)."""

    match: str = ""
    """The stage whose training seconds this stage gets (its mean step time x its max_steps)."""
    step_time_of: str = ""
    """The stage whose mean seconds per step predicts this stage's (same model size and batch,
    e.g. the SFT stage this control continues). ``train.max_steps`` = match's seconds / this."""


@dataclass
class StageConfig:
    """One stage of a pipeline."""

    name: str = ""
    """Unique name; references use it (``${NAME.final}``) and the stage writes to OUTPUT_DIR/NAME."""
    command: str = ""
    """A posttrain command: pretrain, sft, rm, prm, preference, rl, search, ..."""
    recipe: str | dict[str, Any] | None = None
    """A recipe file (path relative to the current directory) or an inline mapping; None = the
    command's defaults."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted keys laid over the recipe, e.g. ``model.path: ${sft.final}``."""
    graded: bool = True
    """Grade this stage's model on the held-out split (a column of the report's table)."""
    equal_compute: EqualComputeConfig | None = None
    """Set ``train.max_steps`` so this stage trains as long as another (see the class)."""
    seeds: list[int] = field(default_factory=list)
    """Also run this stage with each of these seeds (``seed: S`` laid over its recipe) as stages
    ``NAME-sS`` right after it, each with its own folder, fingerprint and accuracy column.
    References to NAME use the main run; a `compare` over NAME reports mean +- sd over all its runs.
    On the command line: ``stages.NAME.seeds=[1,2]``."""


@dataclass
class GradeConfig:
    """Held-out accuracy of every stage's model on the task suite's test split (greedy)."""

    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: ["arith_mag"])
    """Tasks to grade."""
    levels: list[int] | None = None
    """Levels to grade (None: every level)."""
    n_per_level: int = 100
    """Test problems per task and level."""
    max_new_tokens: int = 64
    """Generation budget per answer."""
    batch_size: int = 100
    """Prompts per generate call."""
    seed: int = 0
    """Seed of the test split."""
    models: dict[str, str] = field(default_factory=dict)
    """Models graded beside the stages, a column each before them: ``{name: model folder}``, e.g.
    the checkpoint the first stage starts from (``{base: .cache/models/smollm2-135m-instruct}``)."""


@dataclass
class CompareConfig:
    """A report section: did the treatment or the control end higher, per part of each task?"""

    treatment: str = ""
    """Stage of the method under test (e.g. grpo)."""
    control: str = ""
    """Stage of the control (e.g. more SFT for the same compute)."""
    baseline: str = ""
    """Stage both started from (e.g. sft). If it is an SFT stage on the task suite, the verdict
    splits each task into the levels it had demonstrations of and the levels it had none of."""


@dataclass
class PipelineRecipe:
    """`posttrain run PIPELINE.yaml`: the stages, the grading, and the report's comparisons."""

    stages: list[StageConfig] = field(default_factory=list)
    eval: GradeConfig = field(default_factory=GradeConfig)
    compare: list[CompareConfig] = field(default_factory=list)
    output_dir: str = "runs/pipeline"
    """Where the stages, pipeline_state.json and report.md go."""

    def validate(self) -> None:
        if not self.stages:
            raise ConfigError("a pipeline needs at least one stage", where="stages",
                              fix="list stages, e.g. - {name: sft, command: sft, recipe: recipes/sft_tiny.yaml}")  # fmt: skip
        seen: dict[str, CommandSpec] = {}
        stages = expand_seeds(self.stages)
        for i, st in enumerate(stages):
            where = f"stages[{i}]" + (f" ({st.name})" if st.name else "")
            if not NAME.match(st.name):
                raise ConfigError(f"stage name {st.name!r} is not a name", where=f"{where}.name",
                                  fix="use letters, digits, _ and -, starting with a letter")  # fmt: skip
            if st.name in seen:
                raise ConfigError(
                    f"two stages are named {st.name!r}", where=f"{where}.name", fix="rename one"
                )
            spec = get_command(st.command, f"{where}.command")
            for ref_stage, key, at in references(st):
                check_reference(st.name, ref_stage, key, at, seen, [s.name for s in stages])
            if st.equal_compute is not None:
                for at in ("match", "step_time_of"):
                    ref = getattr(st.equal_compute, at)
                    check_reference(st.name, ref, "output_dir", f"equal_compute.{at}", seen,
                                    [s.name for s in stages])  # fmt: skip
            check_stage_recipe(st, spec)
            seen[st.name] = spec
        for name in self.eval.models:
            if name in seen:
                raise ConfigError(f"eval.models.{name}: a stage has that name", where=f"eval.models.{name}",
                                  fix="give the graded model another column name")  # fmt: skip
        graded = [*self.eval.models, *seen]
        for i, c in enumerate(self.compare):
            for at in ("treatment", "control", "baseline"):
                if getattr(c, at) not in graded:
                    raise ConfigError(f"compare[{i}].{at}: no stage named {getattr(c, at)!r}",
                                      where=f"compare[{i}].{at}", fix=_did_you_mean(getattr(c, at), graded))  # fmt: skip


def expand_seeds(stages: list[StageConfig]) -> list[StageConfig]:
    """The stages with each stage's `seeds` runs inserted after it (``NAME-sS``, ``seed: S``)."""
    out: list[StageConfig] = []
    for st in stages:
        out.append(st)
        out += [dataclasses.replace(st, name=f"{st.name}-s{s}", seeds=[], overrides={**st.overrides, "seed": s})
                for s in st.seeds]  # fmt: skip
    return out


def seed_runs(stages: list[StageConfig]) -> dict[str, list[str]]:
    """Stage name -> the names of all its runs (itself, then its `seeds` runs)."""
    return {st.name: [st.name, *(f"{st.name}-s{s}" for s in st.seeds)] for st in stages}


def _did_you_mean(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"stages so far: {', '.join(names) or 'none'}"


def references(stage: StageConfig) -> list[tuple[str, str, str]]:
    """(stage, key, where) of every ``${stage.key}`` in the stage's recipe mapping and overrides."""
    found: list[tuple[str, str, str]] = []

    def walk(value: Any, at: str) -> None:
        if isinstance(value, str):
            found.extend((m.group(1), m.group(2), at) for m in REF.finditer(value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{at}.{k}" if at else str(k))
        elif isinstance(value, list):
            for j, v in enumerate(value):
                walk(v, f"{at}[{j}]")

    if isinstance(stage.recipe, dict):
        walk(stage.recipe, "recipe")
    walk({f"overrides.{k}": v for k, v in stage.overrides.items()}, "")
    return found


def check_reference(
    stage: str, ref: str, key: str, at: str, before: dict[str, CommandSpec], all_names
) -> None:
    where = f"stage {stage}, {at}"
    if ref not in before:
        if ref == stage or ref in all_names:
            raise ConfigError(f"${{{ref}.{key}}} refers to {'itself' if ref == stage else 'a later stage'}",
                              where=where, fix="a stage may only use the outputs of stages listed before it")  # fmt: skip
        raise ConfigError(
            f"${{{ref}.{key}}}: no stage named {ref!r}", where=where, fix=_did_you_mean(ref, before)
        )
    keys = before[ref].output_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean ${{{ref}.{close[0]}}}? " if close else ""
        raise ConfigError(f"${{{ref}.{key}}}: stage {ref!r} has no output {key!r}", where=where,
                          fix=f"{hint}its outputs: {', '.join(keys)}")  # fmt: skip


def check_stage_recipe(stage: StageConfig, spec: CommandSpec) -> None:
    """Parse the stage's recipe with references left in place, so a typo fails before any stage
    runs; errors about a referenced value itself wait until the reference is resolved."""
    try:
        raw = stage_raw(stage, lambda m: m.group(0), "unused")
        from_dict(spec.recipe_type(), raw, source=f"stage {stage.name}")
    except ConfigError as exc:
        if "${" not in exc.render():
            raise


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section", where=where)
    node[parts[-1]] = value


def _substitute(value: Any, sub) -> Any:
    if isinstance(value, str):
        whole = REF.fullmatch(value)
        return sub(whole) if whole else REF.sub(lambda m: str(sub(m)), value)
    if isinstance(value, dict):
        return {k: _substitute(v, sub) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, sub) for v in value]
    return value


def stage_raw(stage: StageConfig, sub, output_dir: str) -> dict[str, Any]:
    """The stage's recipe as a raw mapping: file or inline, overrides laid over, references
    substituted by ``sub(match)``, ``output_dir`` defaulted to OUTPUT_DIR/NAME."""
    if isinstance(stage.recipe, str):
        path = Path(stage.recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}", where=f"stage {stage.name}, recipe",
                              fix="give a path relative to the current directory, or an inline mapping")  # fmt: skip
        raw = yaml.safe_load(path.read_text()) or {}
    else:
        raw = copy.deepcopy(stage.recipe or {})
    raw = _substitute(raw, sub)
    raw["output_dir"] = output_dir
    for key, value in stage.overrides.items():
        _set_dotted(raw, key, _substitute(value, sub), f"stage {stage.name}, overrides")
    return raw


def load_pipeline(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineRecipe:
    """Read a pipeline file; ``stages.NAME.key=value`` overrides go to that stage's recipe."""
    top = [o for o in overrides if not o.startswith("stages.")]
    cfg = load_recipe(PipelineRecipe, path, top)
    by_name = {s.name: s for s in cfg.stages}
    for item in overrides:
        if not item.startswith("stages."):
            continue
        key, eq, value = item.partition("=")
        _, name, *rest = key.split(".")
        if not eq or not rest:
            raise ConfigError(f"override {item!r} is not of the form stages.NAME.key=value", where=key,
                              fix="write e.g. stages.sft.train.max_steps=10")  # fmt: skip
        if name not in by_name:
            raise ConfigError(f"override {key!r}: no stage named {name!r}", where=key,
                              fix=_did_you_mean(name, by_name))  # fmt: skip
        parsed = yaml.safe_load(value) if value.strip() else ""
        if rest == ["seeds"]:  # a stage key, not a recipe key
            if not (isinstance(parsed, list) and all(isinstance(v, int) for v in parsed)):
                raise ConfigError(f"{key} must be a list of integers, got {value!r}", where=key,
                                  fix=f"write e.g. {key}=[1,2]")  # fmt: skip
            by_name[name].seeds = parsed
            continue
        by_name[name].overrides[".".join(rest)] = parsed
    cfg.validate()
    return cfg


# ---- running -----------------------------------------------------------------------------------

_SKIP_DIRS = {"checkpoints", "tb", "traces"}


def digest(path: Path) -> str:
    """Content hash of a file, or of a folder's files (checkpoints/, tb/, traces/ excluded)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not _SKIP_DIRS & set(p.relative_to(path).parts[:-1])
    )  # fmt: skip
    for f in files:
        h.update((f.name if f == path else str(f.relative_to(path))).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class PipelineState:
    """``pipeline_state.json``: per stage its status, fingerprint, outputs, output hash, wall time.
    Written atomically after every change, so a killed pipeline leaves a readable state."""

    def __init__(self, out: Path):
        self.path = out / "pipeline_state.json"
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.stages = json.loads(self.path.read_text()).get("stages", {})

    def save(self) -> None:
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=1))
        os.replace(tmp, self.path)

    def done(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        """The finished record of ``name`` if it matches and its output is intact, else None."""
        rec = self.stages.get(name)
        if not rec or rec.get("status") != "done" or rec.get("fingerprint") != fingerprint:
            return None
        path = Path(rec["outputs"]["path"])
        return rec if path.exists() and digest(path) == rec["digest"] else None


@dataclass
class StageResult:
    name: str
    command: str
    status: str
    """``ran``, ``resumed`` or ``skipped``."""
    seconds: float
    outputs: dict[str, str]
    recipe: Any


def equal_compute_steps(cfg: EqualComputeConfig, state: PipelineState, recipes: dict[str, Any]) -> int:
    """Steps that give this stage ``match``'s training seconds at ``step_time_of``'s step time."""
    from posttrain.pipelines.report import mean_step_seconds

    def per_step(name: str) -> float:
        rec = state.stages[name]
        secs = mean_step_seconds(Path(rec["outputs"]["output_dir"]), COMMANDS[rec["command"]].step_time_key)
        if secs is None:
            raise ConfigError(f"stage {name} logged no step timings", where="equal_compute",
                              fix=f"check {rec['outputs']['output_dir']}/metrics.jsonl")  # fmt: skip
        return secs

    seconds = per_step(cfg.match) * recipes[cfg.match].train.max_steps
    return max(1, round(seconds / per_step(cfg.step_time_of)))


def resolve_stage(st: StageConfig, cfg: PipelineRecipe, state: PipelineState, recipes: dict[str, Any]):
    """The stage's typed recipe with references resolved, and its fingerprint."""
    spec = COMMANDS[st.command]
    used: dict[str, str] = {}

    def sub(m: re.Match) -> str:
        ref, key = m.group(1), m.group(2)
        rec = state.stages.get(ref, {})
        value = rec.get("outputs", {}).get(key)
        if rec.get("status") != "done" or value is None or not Path(value).exists():
            raise PosttrainError(f"{m.group(0)} is missing: stage {ref} has not finished or its output was "
                                 "removed", where=f"stage {st.name}",
                                 fix="rerun the pipeline; finished stages are skipped, the missing one reruns")  # fmt: skip
        used[ref] = rec["digest"]
        return value

    raw = stage_raw(st, sub, str(Path(cfg.output_dir) / st.name))
    if st.equal_compute is not None:
        for ref in (st.equal_compute.match, st.equal_compute.step_time_of):
            used[ref] = state.stages[ref]["digest"]
        steps = equal_compute_steps(st.equal_compute, state, recipes)
        raw.setdefault("train", {})["max_steps"] = steps
        if isinstance(raw.get("optim"), dict) and "warmup_steps" in raw["optim"]:
            raw["optim"]["warmup_steps"] = min(raw["optim"]["warmup_steps"], steps)
    recipe = from_dict(spec.recipe_type(), raw, source=f"stage {st.name}")
    settings = non_default(to_dict(recipe), to_dict(spec.recipe_type()()))
    body = json.dumps({"command": st.command, "recipe": settings, "inputs": used}, sort_keys=True)
    return recipe, hashlib.sha256(body.encode()).hexdigest()[:16]


def non_default(values: Any, defaults: Any) -> Any:
    """The resolved recipe less every value equal to its default. Fingerprints hash this, so a new
    release that adds a setting (at its default) does not make finished stages rerun."""
    if not (isinstance(values, dict) and isinstance(defaults, dict)):
        return values
    return {k: non_default(v, defaults.get(k)) for k, v in values.items()
            if k not in defaults or v != defaults[k]}  # fmt: skip


def _move_aside(path: Path, out: Path) -> Path | None:
    """Move a stale stage folder inside the pipeline's folder to NAME.stale-K (never delete)."""
    if not path.exists() or not path.resolve().is_relative_to(out.resolve()):
        return None
    k = 1
    while (aside := path.with_name(f"{path.name}.stale-{k}")).exists():
        k += 1
    path.rename(aside)
    return aside


def run_stage(
    st: StageConfig, cfg: PipelineRecipe, state: PipelineState, recipes: dict[str, Any]
) -> StageResult:
    from posttrain.monitor.logger import console

    spec = COMMANDS[st.command]
    recipe, fp = resolve_stage(st, cfg, state, recipes)
    recipes[st.name] = recipe
    if (rec := state.done(st.name, fp)) is not None:
        console.print(
            f"[bold]stage {st.name}[/bold] ({st.command}): done earlier with this recipe and inputs, skipped"
        )
        return StageResult(st.name, st.command, "skipped", rec["seconds"], rec["outputs"], recipe)
    prev = state.stages.get(st.name)
    resuming = prev is not None and prev.get("status") == "running" and prev.get("fingerprint") == fp
    if not resuming and (aside := _move_aside(Path(recipe.output_dir), Path(cfg.output_dir))):
        console.print(f"stage {st.name}: recipe or inputs changed; the old output was moved to {aside}")
    state.stages[st.name] = {"status": "running", "command": st.command, "fingerprint": fp}
    state.save()
    console.print(f"[bold]stage {st.name}[/bold] ({st.command}){' resuming' if resuming else ''}")
    t0 = time.perf_counter()
    try:
        returned = spec.runner()(recipe)
    except PosttrainError as exc:
        exc.where = f"stage {st.name} ({st.command})" + (f", {exc.where}" if exc.where else "")
        exc.fix = (exc.fix + "; " if exc.fix else "") + "rerun the same command: finished stages are skipped"
        raise
    seconds = time.perf_counter() - t0
    outputs = stage_outputs(spec, recipe, Path(returned))
    state.stages[st.name] = {"status": "done", "command": st.command, "fingerprint": fp, "outputs": outputs,
                             "digest": digest(Path(returned)), "seconds": seconds}  # fmt: skip
    state.save()
    return StageResult(st.name, st.command, "resumed" if resuming else "ran", seconds, outputs, recipe)


def grade_model(out: Path, name: str, path: str, grading: GradeConfig):
    """Grade a model named in ``eval.models`` as if it were a finished stage's output."""
    from posttrain.pipelines.report import grade_stage

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"eval.models.{name}: {path} is not a model folder (no config.json)",
                          where=f"eval.models.{name}", fix="give a model folder, e.g. a stage's final/")  # fmt: skip
    return grade_stage(out, name, {"digest": digest(Path(path)), "outputs": {"final": path}}, grading)


def run_pipeline(cfg: PipelineRecipe) -> Path:
    """Run (or resume) every stage in order, grading models as they come; returns report.md."""
    from posttrain.pipelines.report import grade_stage, write_report

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    state = PipelineState(out)
    recipes: dict[str, Any] = {}
    results: list[StageResult] = []
    grades = {name: grade_model(out, name, path, cfg.eval) for name, path in cfg.eval.models.items()}
    for st in expand_seeds(cfg.stages):
        results.append(run_stage(st, cfg, state, recipes))
        spec = COMMANDS[st.command]
        if cfg.eval.enabled and st.graded and spec.output == "final" and spec.policy:
            grades[st.name] = grade_stage(out, st.name, state.stages[st.name], cfg.eval)
    return write_report(cfg, results, grades)
