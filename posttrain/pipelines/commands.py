"""The commands a pipeline stage may run: each one's typed recipe, entry function and outputs.

A stage's command is any posttrain command that turns a recipe into artefacts. The runner calls
the same importable function the command line does (`run_sft`, `run_rl`, ...) and names what it
returned, so later stages can reference it: ``${sft.final}`` (a model folder), ``${rs.data}``
(a data file), ``${ev.results}`` (a results file), and ``${any.output_dir}`` / ``${any.path}``.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError


@dataclass(frozen=True)
class CommandSpec:
    """How the runner drives one command."""

    recipe: str
    """``module:Class`` of the typed recipe."""
    run: str
    """``module:function`` taking the recipe, returning its main output path."""
    output: str
    """Name of the main output in references: ``final`` (a model folder), ``data`` (a data file),
    ``results``, ``report`` or ``out`` (a folder)."""
    step_time_key: str = "step_time_s"
    """metrics.jsonl key of a training step's seconds (for equal-compute budgets)."""
    policy: bool = True
    """A ``final`` output is a policy that can be graded (a reward model's is not)."""
    data_file: str | None = None
    """A data file inside the returned folder, referenced as ``${stage.data}``."""

    def recipe_type(self) -> type:
        return _load(self.recipe)

    def runner(self) -> Any:
        return _load(self.run)

    def output_keys(self) -> list[str]:
        return [self.output, "path", "output_dir", *(["data"] if self.data_file else [])]


COMMANDS: dict[str, CommandSpec] = {
    "pretrain": CommandSpec("posttrain.train.pretrain:PretrainRecipe", "posttrain.train.pretrain:run_pretrain", "final"),
    "sft": CommandSpec("posttrain.train.sft:SFTRecipe", "posttrain.train.sft:run_sft", "final"),
    "rm": CommandSpec("posttrain.train.rm:RMRecipe", "posttrain.train.rm:run_rm", "final", policy=False),
    "prm": CommandSpec("posttrain.train.prm:PRMRecipe", "posttrain.train.prm:run_prm", "final", policy=False),
    "preference": CommandSpec("posttrain.train.preference:PreferenceRecipe", "posttrain.train.preference:run_preference", "final"),
    "rl": CommandSpec("posttrain.train.rl:RLRecipe", "posttrain.train.rl:run_rl", "final", "time/step_s"),
    "search": CommandSpec("posttrain.search.compare:SearchRecipe", "posttrain.search.compare:run_search_recipe", "report"),
    "generate": CommandSpec("posttrain.synth.generate:GenerateRecipe", "posttrain.synth.generate:run_generate", "data"),
    "filter": CommandSpec("posttrain.synth.rejection:FilterRecipe", "posttrain.synth.rejection:run_filter", "data"),
    "eval": CommandSpec("posttrain.eval.runner:EvalRecipe", "posttrain.eval.runner:run_eval", "results"),
    "distill": CommandSpec("posttrain.train.distill:DistillRecipe", "posttrain.train.distill:run_distill", "final"),
    "export": CommandSpec("posttrain.models.export:ExportRecipe", "posttrain.models.export:run_export", "out"),
    "clean": CommandSpec("posttrain.data.quality.clean:CleanRecipe", "posttrain.data.quality.clean:run_clean", "out", data_file="kept.jsonl"),
    "prm-label": CommandSpec("posttrain.search.prm_label:PRMLabelRecipe", "posttrain.search.prm_label:run_prm_label", "data"),
    "prm-conf": CommandSpec("posttrain.train.prm_conf:PRMConfRecipe", "posttrain.train.prm_conf:run_prm_conf", "final", policy=False),
    "self-improve": CommandSpec("posttrain.search.self_improve:SelfImproveRecipe", "posttrain.search.self_improve:run_self_improve", "results"),
}  # fmt: skip
"""Every command a stage may name. A new stage command adds one line here."""


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def get_command(name: str, where: str) -> CommandSpec:
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown command {name!r}", where=where, fix=f"{hint}valid commands: {', '.join(COMMANDS)}"
        )
    return COMMANDS[name]


def stage_outputs(spec: CommandSpec, recipe: Any, returned: Path) -> dict[str, str]:
    """The names a stage's outputs are referenced by."""
    if spec.output == "final":  # <output_dir>/final; pretrain's "default" dir is the cache folder
        out_dir = Path(returned).parent
    else:
        out_dir = Path(getattr(recipe, "output_dir", None) or Path(returned).parent)
    outputs = {spec.output: str(returned), "path": str(returned), "output_dir": str(out_dir)}
    if spec.data_file:
        outputs["data"] = str(Path(returned) / spec.data_file)
    return outputs
