"""`posttrain prm-label RECIPE.yaml`: PRM and value-model data from Monte-Carlo rollouts of a policy.

The policy samples chains for task-suite problems and labels their steps by completing each
step prefix ``mc.k`` times (`posttrain.search.mc_labels`). Writes to ``output_dir``:

- ``prm.jsonl``: stepwise records for `posttrain prm` (``data.train=.../prm.jsonl``);
- ``values.jsonl``: prefix -> value targets (the form of `search.export.export_values`);
- ``oracle.jsonl``: the same chains with their true step labels (`Task.check_steps`), to
  measure a PRM on the policy's own chains (``data.eval=.../oracle.jsonl`` of a test split);
- ``stats.json``: the recipe, rollout counts, and how the MC labels agree with the true ones.

A rerun with the same recipe and output_dir returns the finished files without sampling.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.monitor.logger import console
from posttrain.search.compare import SearchModelConfig, TaskSetConfig, load_policy
from posttrain.search.mc_labels import (
    LabelledChain,
    MCLabelConfig,
    MCStats,
    label_chains,
    oracle_records,
    prm_records,
    value_records,
)
from posttrain.search.protocols import PolicyLike


@dataclass
class PRMLabelRecipe:
    """`posttrain prm-label RECIPE.yaml`: every key of a Monte-Carlo labelling run."""

    model: SearchModelConfig = field(default_factory=SearchModelConfig)
    """The policy that samples the chains and the rollouts (`default`: the embedded model)."""
    problems: TaskSetConfig = field(
        default_factory=lambda: TaskSetConfig(
            tasks=["arith_mag"], levels=[2, 3], n_per_level=100, split="train"
        )
    )
    """The questions to sample chains for (train split for PRM training, test for held-out chains)."""
    mc: MCLabelConfig = field(default_factory=MCLabelConfig)
    """Chains per question, rollouts per prefix, full scan or binary search, soft or hard labels."""
    output_dir: str = "runs/prm_label"
    """Folder of prm.jsonl, values.jsonl, oracle.jsonl and stats.json."""
    force: bool = False
    """Relabel even if output_dir holds a finished run of the same recipe."""


def agreement(chains: list[LabelledChain], oracle: list[dict[str, Any]]) -> dict[str, float]:
    """How the MC hard labels and first errors agree with the true step labels of the same chains."""
    steps = sum(len(c.hard) for c in chains)
    same = sum(
        h == int(y >= 0.5)
        for c, o in zip(chains, oracle, strict=True)
        for h, y in zip(c.hard, o["labels"], strict=True)
    )
    true_first = [next((i for i, y in enumerate(o["labels"]) if y < 0.5), None) for o in oracle]
    first = sum(c.first_error == t for c, t in zip(chains, true_first, strict=True))
    wrong = sum(t is not None for t in true_first)
    return {
        "chains": len(chains),
        "steps": steps,
        "chain_accuracy": sum(c.correct for c in chains) / max(len(chains), 1),
        "chains_with_a_wrong_step": wrong / max(len(chains), 1),
        "hard_label_accuracy": same / max(steps, 1),
        "first_error_agreement": first / max(len(chains), 1),
    }


def _label_all(recipe: PRMLabelRecipe, queries: list, policy) -> tuple[list[LabelledChain], MCStats]:
    """Label in chunks of queries (bounded memory, progress); chunk i samples with seed + i."""
    from posttrain.search.scorers import task_verifier

    verify = task_verifier().verify
    size = max(1, recipe.model.max_batch_rows // max(recipe.mc.n_chains, recipe.mc.k))
    chains, total = [], MCStats()
    for i, at in enumerate(range(0, len(queries), size)):
        seed = None if recipe.mc.seed is None else recipe.mc.seed + i
        part, stats = label_chains(
            policy, queries[at : at + size], dataclasses.replace(recipe.mc, seed=seed), verify
        )
        chains += [dataclasses.replace(c, query_index=c.query_index + at) for c in part]
        for key, value in asdict(stats).items():
            setattr(total, key, getattr(total, key) + value)
        console.print(
            f"prm-label: {min(at + size, len(queries))}/{len(queries)} questions, {total.rollouts} rollouts"
        )
    return chains, total


def _check_chains(chains: list[LabelledChain], stats: MCStats, step_sep: str) -> None:
    """No chain with steps is an error; no verified chain is a warning (every label would be 0)."""
    if not chains:
        raise DataError(
            f"none of the {stats.chains} sampled chains has a <think> block of steps split by {step_sep!r}",
            where="mc.step_sep",
            fix="use a policy that writes <think>s1<step>s2...</think> chains (the default model or an "
            "SFT model on the task suite), or set mc.step_sep to the policy's separator",
        )
    if not any(c.correct for c in chains):
        console.print(
            "[yellow]warning[/yellow]: no sampled chain verifies, so every label is 0; "
            "use easier problems (problems.levels) or a stronger policy"
        )


def run_prm_label(recipe: PRMLabelRecipe, policy: PolicyLike | None = None) -> Path:
    """Sample, label and write the files (see the module docstring); returns ``prm.jsonl``.

    ``policy``: a generation engine to use instead of loading ``model`` (prompts are then plain)."""
    from posttrain.data.loaders import write_jsonl
    from posttrain.data.tasks import task_problems
    from posttrain.search.base import queries_from_problems

    out = Path(recipe.output_dir)
    config = json.loads(json.dumps(asdict(recipe)))
    config.pop("force")
    stats_path = out / "stats.json"
    if (
        not recipe.force
        and stats_path.is_file()
        and json.loads(stats_path.read_text()).get("recipe") == config
    ):
        console.print(f"prm-label: reusing {out} (same recipe; force=true relabels)")
        return out / "prm.jsonl"
    p = recipe.problems
    problems = task_problems(p.tasks, p.split, p.n_per_level, p.seed, p.levels)
    policy, tokenizer = load_policy(recipe.model) if policy is None else (policy, None)
    queries = queries_from_problems(problems, tokenizer)
    chains, stats = _label_all(recipe, queries, policy)
    _check_chains(chains, stats, recipe.mc.step_sep)
    oracle = oracle_records(chains, queries)
    write_jsonl(out / "prm.jsonl", prm_records(chains, queries, recipe.mc.label))
    write_jsonl(out / "values.jsonl", value_records(chains, queries, recipe.mc.k))
    write_jsonl(out / "oracle.jsonl", oracle)
    summary = {"recipe": config, "cost": asdict(stats), "agreement": agreement(chains, oracle)}
    tmp = stats_path.with_name(f".stats.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, stats_path)
    console.print(f"prm-label: {json.dumps(summary['cost'])}\n{json.dumps(summary['agreement'])}")
    return out / "prm.jsonl"


def prm_label_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """`posttrain prm-label RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe

    return run_prm_label(load_recipe(PRMLabelRecipe, recipe_path, overrides))
