"""The quickstart pipeline: pretrain (or reuse) -> SFT -> held-out accuracy before/after.

Every stage is the same function its own CLI command runs; this file only
chains them and writes `OUTPUT_DIR/report.md`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.eval.accuracy import AccuracyReport, format_table, task_accuracy
from posttrain.models.load import load_model, load_tokenizer
from posttrain.monitor.logger import console
from posttrain.train.loop import LoopConfig
from posttrain.train.optim import OptimConfig
from posttrain.train.pretrain import PretrainRecipe, run_pretrain
from posttrain.train.sft import SFTRecipe, run_sft


@dataclass
class EvalConfig:
    """Held-out accuracy on the task suite's test split."""

    tasks: list[str] = field(default_factory=lambda: ["arith", "countdown", "sort"])
    """Tasks to grade."""
    n_per_level: int = 50
    """Test problems per task and level."""
    max_new_tokens: int = 96
    """Generation budget per answer (greedy)."""
    batch_size: int = 100
    """Prompts per generate call."""
    seed: int = 0
    """Seed of the test split."""


def _default_sft() -> SFTRecipe:
    return SFTRecipe(
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1),
        train=LoopConfig(max_steps=500, batch_size=8, seq_len=256, eval_every=250),
        output_dir="runs/quickstart/sft",
    )


@dataclass
class QuickstartRecipe:
    """`posttrain run recipes/quickstart.yaml`: the stages and where they write."""

    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    sft: SFTRecipe = field(default_factory=_default_sft)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/quickstart"
    """Where report.md, accuracy.json and the per-problem completions go."""


def evaluate(model_dir: str | Path, cfg: EvalConfig) -> tuple[AccuracyReport, list[dict]]:
    from posttrain.data.tasks import make_split

    problems = [p for t in cfg.tasks for p in make_split(t, "test", cfg.n_per_level, seed=cfg.seed)]
    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    return task_accuracy(model, tok, problems, cfg.max_new_tokens, cfg.batch_size)


def run_quickstart(cfg: QuickstartRecipe) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    base = run_pretrain(cfg.pretrain)
    timings["pretrain"] = time.perf_counter() - t
    before, before_rows = evaluate(base, cfg.eval)
    if cfg.sft.model.path == "default":
        cfg.sft.model.path = str(base)
    t = time.perf_counter()
    sft_dir = run_sft(cfg.sft)
    timings["sft"] = time.perf_counter() - t
    after, after_rows = evaluate(sft_dir, cfg.eval)
    reports = {"pretrained": before, "after SFT": after}
    console.print("\n[bold]held-out accuracy (%), greedy, verifier-graded[/bold]\n" + format_table(reports))
    write_report(out, reports, timings, {"pretrained": base, "sft": sft_dir})
    for name, rows in (("pretrained", before_rows), ("sft", after_rows)):
        with open(out / f"completions_{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    console.print(f"report: {out / 'report.md'}")
    return out / "report.md"


def write_report(out: Path, reports: dict[str, AccuracyReport], timings: dict, models: dict) -> None:
    lines = [
        "# posttrain quickstart report",
        "",
        "Held-out accuracy (%) on the task suite's test split; greedy decoding, graded by each task's verifier.",
        "",
        format_table(reports, markdown=True),
        "",
        "## Stages",
        "",
        *[f"- {k}: {v:.1f} s" for k, v in timings.items()],
        *[f"- model `{k}`: `{v}`" for k, v in models.items()],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "accuracy.json").write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=1))
