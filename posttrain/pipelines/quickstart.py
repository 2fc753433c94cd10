"""The quickstart pipeline: pretrain (or reuse) -> SFT -> GRPO -> held-out accuracy, plus an
equal-compute "more SFT" control and a test-time search table.

Every stage is the same function its own CLI command runs (`posttrain pretrain`, `sft`, `rl`,
`search`); this file only chains them and writes `OUTPUT_DIR/report.md` with the accuracy
table, the GRPO curves (`rl_curves.svg`) and the strategy table.

The control answers "was RL worth it?": it continues SFT from the same SFT model on the same
demonstrations for as much wall-clock time as GRPO took (steps = GRPO seconds / SFT seconds
per step), so the GRPO and control columns compare equal compute.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.sft_data import DataConfig
from posttrain.eval.accuracy import AccuracyReport, format_table, task_accuracy
from posttrain.models.load import load_model, load_tokenizer
from posttrain.monitor.logger import console
from posttrain.monitor.plots import chart_grid, metric_series
from posttrain.train.loop import LoopConfig, ModelConfig
from posttrain.train.optim import OptimConfig
from posttrain.train.pretrain import PretrainRecipe, run_pretrain
from posttrain.train.rl import RLEvalConfig, RLRecipe, RLTrainConfig, run_rl
from posttrain.train.rl_data import RLDataConfig
from posttrain.train.rl_rollout import RolloutConfig
from posttrain.train.rl_update import AlgorithmConfig, KLConfig
from posttrain.train.sft import SFTRecipe, run_sft

TASKS = ["arith_mag"]
"""Graded tasks: arith_mag keeps the chain fixed and raises the numbers per level, so SFT can stop
at a level and GRPO be measured on the levels past it."""


@dataclass
class EvalConfig:
    """Held-out accuracy on the task suite's test split."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Tasks to grade."""
    n_per_level: int = 50
    """Test problems per task and level."""
    max_new_tokens: int = 96
    """Generation budget per answer (greedy)."""
    batch_size: int = 100
    """Prompts per generate call."""
    seed: int = 0
    """Seed of the test split."""


@dataclass
class ControlConfig:
    """The equal-compute control: more SFT instead of GRPO."""

    enabled: bool = True
    """Run it (costs as much wall time as the GRPO stage)."""
    lr: float = 1e-4
    """Peak learning rate of the continued SFT (warm-up 5 steps, cosine decay); the SFT stage ends at
    lr * min_lr_ratio, so this continues near where it stopped."""
    tasks: list[str] | None = None
    """Demonstrations to continue on; null = the GRPO stage's tasks (a like-for-like comparison)."""


@dataclass
class SearchTableConfig:
    """Test-time strategies on the final model (`posttrain.search.compare.strategy_table`)."""

    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Tasks of the problem set."""
    levels: list[int] = field(default_factory=lambda: [2, 3])
    """Levels of the problem set."""
    n_per_level: int = 10
    """Test problems per task and level."""
    n: int = 8
    """Samples of best-of-N / self-consistency / compute-optimal."""
    prm: str = "oracle_prm"
    """Step scorer of PRM beam and MCTS: `oracle_prm` (the task's step checker) or a PRM folder."""


def _default_sft() -> SFTRecipe:
    return SFTRecipe(
        data=DataConfig(
            train="tasks", tasks=list(TASKS), levels=[1, 2], n_per_level=5000, eval_n_per_level=10
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1),
        train=LoopConfig(max_steps=600, batch_size=8, seq_len=256, eval_every=0),
        output_dir="runs/quickstart/sft",
    )


def _default_rl() -> RLRecipe:
    return RLRecipe(
        data=RLDataConfig(tasks=list(TASKS), levels=[2, 3]),
        algorithm=AlgorithmConfig(
            advantage="grpo", clip_low=0.2, clip_high=0.28, kl=KLConfig(coef=0.02, placement="loss")
        ),
        rollout=RolloutConfig(prompts_per_step=16, n=8, max_new_tokens=64, dynamic_sampling=True, max_refill_rounds=2),
        optim=OptimConfig(lr=3e-5, schedule="constant", warmup_steps=0),
        train=RLTrainConfig(max_steps=60, eval_every=20),
        eval=RLEvalConfig(levels=[1, 2, 3, 4], n_per_level=25, max_new_tokens=96),
        output_dir="runs/quickstart/grpo",
    )  # fmt: skip


@dataclass
class QuickstartRecipe:
    """`posttrain run recipes/quickstart.yaml`: the stages and where they write."""

    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    sft: SFTRecipe = field(default_factory=_default_sft)
    rl: RLRecipe = field(default_factory=_default_rl)
    """The GRPO stage; its model.path `default` means "the SFT stage's output"."""
    rl_enabled: bool = True
    """Run the GRPO stage (and its control)."""
    control: ControlConfig = field(default_factory=ControlConfig)
    search: SearchTableConfig = field(default_factory=SearchTableConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/quickstart"
    """Where report.md, accuracy.json, rl_curves.svg and the per-problem completions go."""


def evaluate(model_dir: str | Path, cfg: EvalConfig) -> tuple[AccuracyReport, list[dict]]:
    from posttrain.data.tasks import task_problems

    problems = task_problems(cfg.tasks, "test", cfg.n_per_level, seed=cfg.seed)
    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    return task_accuracy(model, tok, problems, cfg.max_new_tokens, cfg.batch_size)


def train_seconds(run_dir: Path, key: str, max_steps: int) -> float | None:
    """A run's training time from its own step timings: mean logged ``key`` x ``max_steps``.

    The stages' wall clocks would be wrong on a re-run, where SFT and GRPO resume from their
    finished checkpoints in seconds (the control would then get thousands of steps, or one).
    None when the run logged no timings."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    times = [row[key] for row in map(json.loads, path.read_text().splitlines()) if key in row]
    return sum(times) / len(times) * max_steps if times else None


def control_recipe(cfg: QuickstartRecipe, sft_dir: Path, sft_seconds: float, rl_seconds: float) -> SFTRecipe:
    """More SFT from the SFT model, on the GRPO stage's tasks (by default), for GRPO's wall time."""
    per_step = sft_seconds / cfg.sft.train.max_steps
    steps = max(1, round(rl_seconds / per_step))
    train = LoopConfig(**{**cfg.sft.train.__dict__, "max_steps": steps, "eval_every": 0, "save_every": 0})
    optim = OptimConfig(**{**cfg.sft.optim.__dict__, "lr": cfg.control.lr, "warmup_steps": min(5, steps)})
    tasks = cfg.control.tasks if cfg.control.tasks is not None else cfg.rl.data.tasks
    data = DataConfig(**{**cfg.sft.data.__dict__, "tasks": list(tasks)})
    return SFTRecipe(
        **{**cfg.sft.__dict__, "model": ModelConfig(**{**cfg.sft.model.__dict__, "path": str(sft_dir)}),
           "data": data, "train": train, "optim": optim, "output_dir": str(Path(cfg.output_dir) / "control")}
    )  # fmt: skip


def run_quickstart(cfg: QuickstartRecipe) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    models: dict[str, Path] = {}
    reports: dict[str, AccuracyReport] = {}
    completions: dict[str, list[dict]] = {}

    def stage(name: str, fn, *args) -> Path:
        t = time.perf_counter()
        path = fn(*args)
        timings[name] = time.perf_counter() - t
        models[name] = path
        return path

    def grade(column: str, model_dir: Path) -> None:
        reports[column], completions[column] = evaluate(model_dir, cfg.eval)

    base = stage("pretrain", run_pretrain, cfg.pretrain)
    grade("pretrained", base)
    if cfg.sft.model.path == "default":
        cfg.sft.model.path = str(base)
    sft_dir = stage("sft", run_sft, cfg.sft)
    grade("after SFT", sft_dir)
    final = sft_dir
    if cfg.rl_enabled:
        if cfg.rl.model.path == "default":
            cfg.rl.model.path = str(sft_dir)
        final = stage("grpo", run_rl, cfg.rl)
        grade("after GRPO", final)
        if cfg.control.enabled:
            sft_s = train_seconds(Path(cfg.sft.output_dir), "step_time_s", cfg.sft.train.max_steps)
            rl_s = train_seconds(Path(cfg.rl.output_dir), "time/step_s", cfg.rl.train.max_steps)
            control = control_recipe(cfg, sft_dir, sft_s or timings["sft"], rl_s or timings["grpo"])
            stage("control (more SFT)", run_sft, control)
            grade("more SFT (control)", models["control (more SFT)"])
    console.print("\n[bold]held-out accuracy (%), greedy, verifier-graded[/bold]\n" + format_table(reports))
    strategy_md = strategy_section(cfg, final, timings) if cfg.search.enabled else ""
    curves = write_rl_curves(out, Path(cfg.rl.output_dir)) if cfg.rl_enabled else None
    write_report(out, reports, timings, models, strategy_md, curves, demonstrated_levels(cfg))
    for name, rows in completions.items():
        with open(out / f"completions_{name.split()[-1].strip('()')}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    console.print(f"report: {out / 'report.md'}")
    return out / "report.md"


def strategy_section(cfg: QuickstartRecipe, model_dir: Path, timings: dict[str, float]) -> str:
    """The test-time strategy table on held-out problems, as markdown (also printed)."""
    from posttrain.data.tasks import task_problems
    from posttrain.search.compare import quickstart_strategies, strategy_table
    from posttrain.search.report import compute_ratios, format_markdown

    s = cfg.search
    problems = task_problems(s.tasks, "test", s.n_per_level, seed=cfg.eval.seed, levels=s.levels)
    t = time.perf_counter()
    rows = strategy_table(str(model_dir), problems, quickstart_strategies(prm=s.prm, n=s.n), "verifier")
    timings["search table"] = time.perf_counter() - t
    ratios = compute_ratios(rows)
    table = format_markdown(rows, ratios)
    console.print("\n[bold]test-time strategies[/bold]\n" + table)
    where = f"{', '.join(s.tasks)} levels {', '.join(map(str, s.levels))}, {len(problems)} held-out problems"
    return "\n".join([f"## Test-time strategies on the final model ({where})", "", table, ""])


def write_rl_curves(out: Path, rl_dir: Path) -> Path | None:
    """reward / KL / response length / held-out accuracy of the GRPO run as one SVG."""
    metrics = rl_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None

    def chart(title: str, **keys: str) -> dict:
        return {"series": {name: metric_series(metrics, k) for name, k in keys.items()}, "title": title}

    svg = chart_grid(
        [
            chart("training reward (mean)", reward="reward/total_mean"),
            chart("KL to the SFT model (token mean)", kl="kl/token_mean"),
            chart("response length (tokens)", mean="response/length_mean", max="response/length_max"),
            chart("held-out greedy accuracy", all="eval/task_accuracy/overall", **_level_keys(metrics)),
        ]
    )
    path = out / "rl_curves.svg"
    path.write_text(svg)
    return path


def demonstrated_levels(cfg: QuickstartRecipe) -> dict[str, list[int]]:
    """Task -> the levels the SFT stage (and the control) had demonstrations of."""
    from posttrain.data.tasks import get_task

    if cfg.sft.data.train != "tasks":
        return {}
    wanted = cfg.sft.data.levels
    return {
        t: [lv for lv in get_task(t).levels if wanted is None or lv in wanted] for t in cfg.sft.data.tasks
    }


def _levels(levels: list[int]) -> str:
    return f"L{levels[0]}-{levels[-1]}" if levels == list(range(levels[0], levels[-1] + 1)) else (
        ", ".join(f"L{lv}" for lv in levels)
    )  # fmt: skip


def _level_keys(metrics: Path, most: int = 6) -> dict[str, str]:
    """Series name -> metric key of the per-level held-out accuracies (if there are few)."""
    keys: set[str] = set()
    for line in metrics.read_text().splitlines():
        keys |= {k for k in json.loads(line) if k.startswith("eval/task_accuracy/") and "/L" in k}
    if len(keys) > most:
        return {}
    return {k.removeprefix("eval/task_accuracy/"): k for k in sorted(keys)}


def verdict(reports: dict[str, AccuracyReport], demos: dict[str, list[int]] | None = None) -> list[str]:
    """Per task, and per part of a task with / without demonstrations (``demos``: task -> levels
    SFT saw solved): did GRPO or the equal-compute SFT control end higher (honest, from the table)?"""
    if "after GRPO" not in reports or "more SFT (control)" not in reports:
        return []
    rl, ctl, sft = reports["after GRPO"], reports["more SFT (control)"], reports["after SFT"]
    parts: list[tuple[str, str | None, list[int] | None]] = []
    for task in sorted({k[0] for k in rl.total}):
        levels = sorted(lv for t, lv in rl.total if t == task)
        seen = levels if demos is None else [lv for lv in levels if lv in demos.get(task, [])]
        unseen = [lv for lv in levels if lv not in seen]
        if demos is not None and seen and unseen:
            parts += [(f"{task} {_levels(seen)} (with demonstrations)", task, seen),
                      (f"{task} {_levels(unseen)} (no demonstrations)", task, unseen)]  # fmt: skip
            if len(unseen) > 1:
                parts += [(f"{task} L{lv} (no demonstrations)", task, [lv]) for lv in unseen]
        else:
            note = " (no demonstrations)" if demos is not None and not seen else ""
            parts.append((task + note, task, None))
    parts.append(("all tasks", None, None))
    lines = []
    for name, task, levels in parts:
        a, b, s = (100 * r.acc(task, levels=levels) for r in (rl, ctl, sft))
        if math.isnan(a) or math.isnan(b):
            continue
        winner = "GRPO" if a > b else "more SFT" if b > a else None
        said = f"{winner} ends higher ({a - b:+.1f} points)" if winner else "a tie"
        if max(a, b) <= s:
            said += "; neither improved on the SFT model"
        lines.append(
            f"- {name}: SFT {s:.1f} -> GRPO {a:.1f} ({a - s:+.1f}) vs more SFT {b:.1f} ({b - s:+.1f}): {said}."
        )
    return lines  # fmt: skip


def write_report(
    out: Path,
    reports: dict[str, AccuracyReport],
    timings: dict,
    models: dict,
    strategy_md: str = "",
    curves: Path | None = None,
    demos: dict[str, list[int]] | None = None,
) -> None:
    lines = [
        "# posttrain quickstart report",
        "",
        "Held-out accuracy (%) on the task suite's test split; greedy decoding, graded by each task's verifier.",
        "",
        format_table(reports, markdown=True),
        "",
    ]
    if v := verdict(reports, demos):
        held = [f"{t} {_levels(lv)}" for t, lv in (demos or {}).items()]
        lines += [
            "## GRPO vs the equal-compute control",
            "",
            "GRPO trains on fresh prompts with only the verifier as reward; the control starts from the "
            "same SFT model and spends the same wall time on more SFT over the demonstrations there are"
            + (
                f" ({', '.join(held)}). Levels outside those have no demonstrations: only GRPO can "
                "learn there, from its own verified samples. "
                if held
                else ". "
            )
            + "Where demonstrations are unlimited and perfect, more SFT is expected to win; GRPO's case "
            "is where they run out.",
            "",
            *v,
            "",
        ]
    if curves is not None:
        lines += ["## GRPO curves", "", f"![reward, KL, length and held-out accuracy]({curves.name})", ""]
    if strategy_md:
        lines += [strategy_md]
    cached = {"pretrain": " (reused from the cache)"} if timings.get("pretrain", 1.0) < 1.0 else {}
    lines += ["## Stages", "", *[f"- {k}: {v:.1f} s{cached.get(k, '')}" for k, v in timings.items()],
              f"- total: {sum(timings.values()):.1f} s",
              *[f"- model `{k}`: `{v}`" for k, v in models.items()], ""]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines))
    (out / "accuracy.json").write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=1))
