"""The `posttrain` command line: thin wrappers over importable functions.

    posttrain <command> RECIPE.yaml [key.sub=value ...]

User errors (`PosttrainError`) print as one paragraph and exit non-zero;
`--debug` (or POSTTRAIN_DEBUG=1) shows the traceback too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from posttrain.errors import PosttrainError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training for open LLMs.")
models_app = typer.Typer(no_args_is_help=True, help="Import and inspect models.")
data_app = typer.Typer(no_args_is_help=True, help="Validate and preview data files.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")


def _mount_subapps() -> None:
    from posttrain.cli_templates import templates_app
    from posttrain.rewards.cli import sandbox_app

    app.add_typer(
        templates_app,
        name="templates",
        help="Lint chat templates, add think tokens, export per-turn samples.",
    )
    app.add_typer(sandbox_app, name="sandbox", help="Run model-written code against tests in a sandbox.")


_mount_subapps()

# Which typed recipe each command reads (module:class), so tools and tests can check any recipe file.
RECIPE_TYPES: dict[str, str] = {
    "pretrain": "posttrain.train.pretrain:PretrainRecipe",
    "sft": "posttrain.train.sft:SFTRecipe",
    "rm": "posttrain.train.rm:RMRecipe",
    "prm": "posttrain.train.prm:PRMRecipe",
    "prm-label": "posttrain.search.prm_label:PRMLabelRecipe",
    "prm-conf": "posttrain.train.prm_conf:PRMConfRecipe",
    "self-improve": "posttrain.search.self_improve:SelfImproveRecipe",
    "preference": "posttrain.train.preference:PreferenceRecipe",
    "search": "posttrain.search.compare:SearchRecipe",
    "rl": "posttrain.train.rl:RLRecipe",
    "distill": "posttrain.train.distill:DistillRecipe",
    "generate": "posttrain.synth.generate:GenerateRecipe",
    "filter": "posttrain.synth.rejection:FilterRecipe",
    "clean": "posttrain.data.quality.clean:CleanRecipe",
    "export": "posttrain.models.export:ExportRecipe",
    "run": "posttrain.pipelines.runner:PipelineRecipe",
    "eval": "posttrain.eval.runner:EvalRecipe",
}


def recipe_type(command: str) -> type:
    import importlib

    module, name = RECIPE_TYPES[command].split(":")
    return getattr(importlib.import_module(module), name)


Recipe = Annotated[Path | None, typer.Argument(help="YAML recipe (keys mirror the typed config).")]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.max_steps=10 optim.lr=1e-4.")
]


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    if debug:
        os.environ["POSTTRAIN_DEBUG"] = "1"
    from posttrain.distributed.launch import check_command

    check_command(ctx.invoked_subcommand)  # under torchrun: only the commands that train distributed
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars drown the run's own progress bar


@app.command()
def pretrain(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Pretrain a tiny model from scratch on the task suite (the embedded default)."""
    from posttrain.train.pretrain import pretrain_main

    pretrain_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def sft(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Supervised fine-tuning (full, LoRA, QLoRA, BitFit, prefix/prompt tuning, IA3)."""
    from posttrain.train.sft import sft_main

    sft_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def rm(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Outcome reward model: a scalar head trained on preference pairs or rankings (BT / PL)."""
    from posttrain.train.rm import rm_main

    rm_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def prm(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Process reward model: a per-step score at each step separator, trained on step labels."""
    from posttrain.train.prm import prm_main

    prm_main(str(recipe) if recipe else None, overrides or [])


@app.command("prm-label")
def prm_label(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """PRM and value labels from Monte-Carlo rollouts of a policy (Math-Shepherd / OmegaPRM)."""
    from posttrain.search.prm_label import prm_label_main

    prm_label_main(str(recipe) if recipe else None, overrides or [])


@app.command("prm-conf")
def prm_conf(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Confidence PRM: a head over the frozen policy's step log-probs (scorer conf:PATH)."""
    from posttrain.train.prm_conf import prm_conf_main

    prm_conf_main(str(recipe) if recipe else None, overrides or [])


@app.command("self-improve")
def self_improve(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """The self-improvement loop: search -> verified traces train the policy, MC step values the PRM."""
    from posttrain.search.self_improve import self_improve_main

    self_improve_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def preference(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Offline preference optimisation: DPO, IPO, robust DPO, hinge, SimPO, ORPO, KTO."""
    from posttrain.train.preference import preference_main

    preference_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def rl(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Online RL: PPO, GRPO, Dr.GRPO, RLOO, REINFORCE++, step-aware GRPO with process rewards."""
    from posttrain.train.rl import rl_main

    rl_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def distill(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Distil a teacher into a student: sequence-level, logit KD (KL / JSD, top-k cache) or on-policy (GKD)."""
    from posttrain.train.distill import distill_main

    distill_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def generate(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Sample k completions per prompt (task suite or a prompt file) into JSONL with per-token log-probs."""
    from posttrain.synth.generate import generate_main

    generate_main(str(recipe) if recipe else None, overrides or [])


@app.command("filter")
def filter_cmd(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Rejection sampling: score k completions per prompt, keep the best / all passing as SFT data."""
    from posttrain.synth.rejection import filter_main

    filter_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def plan(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Estimate a training recipe's memory per rank (plan.strategy / plan.world_size / plan.memory_gib); refuse what cannot fit."""
    from posttrain.distributed.plan import plan_main

    plan_main(str(recipe) if recipe else None, overrides or [])


@app.command()
def search(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Compare test-time search strategies on a task set: accuracy, tokens, time, accuracy-vs-compute plot."""
    from posttrain.search.compare import search_main

    search_main(str(recipe) if recipe else None, overrides or [])


@app.command("eval")
def eval_cmd(
    target: Annotated[str, typer.Argument(help="A recipe .yaml, or a model (default, a folder, final/).")],
    overrides: Overrides = None,
    data: Annotated[list[str] | None, typer.Option(help="Data file (repeatable); tasks: the suite.")] = None,
    n: Annotated[int, typer.Option(help="Samples per problem (1: greedy).")] = 1,
    k: Annotated[str | None, typer.Option(help="pass@k / maj@k, e.g. 1,4,8 (default: those <= n).")] = None,
    strategy: Annotated[str | None, typer.Option(help="A registered search strategy as the decoder.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Default 0.8 if n > 1, else 0.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per sample.")] = 256,
    limit: Annotated[int | None, typer.Option(help="At most this many problems per dataset.")] = None,
    reference: Annotated[bool, typer.Option(help="Grade the data's reference solutions, no model.")] = False,
    output_dir: Annotated[str, typer.Option(help="Where results.json and report.md go.")] = "runs/eval",
    harness: Annotated[str | None, typer.Option(help="lm-eval tasks, e.g. t1,t2 ([eval] extra).")] = None,
    harness_include: Annotated[str | None, typer.Option(help="Folder of custom lm-eval task YAMLs.")] = None,
) -> None:
    """Evaluate a model on datasets: accuracy, pass@k, maj@k, reward, lengths, 95% intervals."""
    from posttrain.eval.runner import eval_command

    eval_command(target, overrides or [], data=data or [], n=n, k=k, strategy=strategy, temperature=temperature,
                 max_new_tokens=max_new_tokens, limit=limit, reference=reference, output_dir=output_dir,
                 harness=harness, harness_include=harness_include)  # fmt: skip


@app.command("human-eval")
def human_eval(
    action: Annotated[str, typer.Argument(help="export (a sheet of an eval run) | import.")],
    path: Annotated[str, typer.Argument(help="export: the run's output_dir; import: sheet.csv.")],
    out: Annotated[str | None, typer.Option(help="export: the sheet's folder (RUN_DIR/human).")] = None,
    scale: Annotated[str, typer.Option(help="Pointwise scale: 1-10 or pass_fail.")] = "1-10",
) -> None:
    """Human ratings: export a side-by-side sheet (HTML + CSV), import it (win rates, kappa vs the judge)."""
    from posttrain.eval.human import human_command

    human_command(action, path, out, scale)


@app.command()
def run(recipe: Recipe = None, overrides: Overrides = None) -> None:
    """Run a multi-stage pipeline (stages, references between them, resume, one report), e.g. the
    quickstart. Overrides address a stage by name: stages.sft.train.max_steps=10."""
    from posttrain.pipelines.runner import load_pipeline, run_pipeline

    run_pipeline(load_pipeline(recipe, overrides or []))


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run output dirs (overlaid), or one pipeline dir.")],
    out: Annotated[Path | None, typer.Option(help="Where to write (default: FIRST_DIR/report.html).")] = None,
    serve: Annotated[
        bool, typer.Option(help="Serve a live view on 127.0.0.1 instead (refreshes as runs log).")
    ] = False,
    port: Annotated[int, typer.Option(help="--serve: the port (0 = any free one).")] = 8765,
) -> None:
    """Write a self-contained report.html (curves, anomalies, config, data, samples) of runs."""
    from posttrain.monitor.html_report import report_main

    if serve:
        from posttrain.monitor.serve import serve_main

        return serve_main(run_dirs, port)
    for path in report_main(run_dirs, out):
        typer.echo(str(path))


@app.command()
def export(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="MODEL_DIR OUT [key=value ...], or RECIPE.yaml [key=value ...]."),
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="hf (merged HF folder) or gguf.")] = None,
    gguf_types: Annotated[str | None, typer.Option("--gguf-types", help="e.g. f16,q8_0 (gguf only).")] = None,
) -> None:
    """Export a model (LoRA merged) as a plain HF folder or as f16/q8_0 GGUF files, checked by re-reading."""
    from posttrain.models.export import cli_arguments, export_main

    typer.echo(str(export_main(*cli_arguments(args or [], fmt, gguf_types))))


@models_app.command("import-gguf")
def import_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="A .gguf file.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the fp32 Hugging Face folder.")],
    check: Annotated[bool, typer.Option(help="Compare logits of the import with the GGUF model.")] = True,
) -> None:
    """Convert a GGUF file into a trainable fp32 Hugging Face folder."""
    from posttrain.models.gguf import import_gguf as _import

    typer.echo(str(_import(gguf_file, out_dir, check=check)))


@models_app.command("inspect")
def inspect_model(path: Annotated[str, typer.Argument(help="Model folder, or `default`.")]) -> None:
    """Print architecture, parameter count, vocabulary and chat-template facts of a model."""
    from posttrain.models.load import count_parameters, load_model, load_tokenizer
    from posttrain.train.loop import resolve_model_path

    path = resolve_model_path(path)
    tok, model = load_tokenizer(path), load_model(path)
    trainable, total = count_parameters(model)
    info = {
        "path": path,
        "architecture": type(model).__name__,
        "parameters": total,
        "vocab": len(tok),
        "eos": tok.eos_token,
        "pad": tok.pad_token,
        "chat_template": bool(tok.chat_template),
        "dtype": str(next(model.parameters()).dtype),
    }
    typer.echo(json.dumps(info, indent=1))


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="JSONL / JSON / Parquet file or a saved HF dataset folder.")],
    kind: Annotated[str | None, typer.Option(help="Expected record kind (default: detected).")] = None,
) -> None:
    """Check every record of a data file; report the first error with file:line."""
    from collections import Counter

    from posttrain.data.loaders import load_records

    records = load_records(path, kind=kind)
    kinds = Counter(r.kind for r in records)
    typer.echo(f"{path}: {len(records)} valid records ({', '.join(f'{k}: {n}' for k, n in kinds.items())})")


@data_app.command("preview")
def data_preview(
    path: Annotated[Path, typer.Argument(help="Data file.")],
    model: Annotated[
        str, typer.Option(help="Model folder whose chat template renders the data.")
    ] = "default",
    n: Annotated[int, typer.Option(help="Samples to show.")] = 2,
) -> None:
    """Render the first samples with the model's chat template and show which tokens are trained."""
    from posttrain.data.loaders import load_records
    from posttrain.data.render import format_summary_table, render_records, summarize
    from posttrain.models.load import load_tokenizer
    from posttrain.train.loop import resolve_model_path

    tok = load_tokenizer(resolve_model_path(model))
    samples = render_records(tok, load_records(path, limit=n))
    for s in samples[:n]:
        parts = []
        for tid, lab in zip(s.input_ids, s.labels, strict=True):
            text = tok.decode([tid])
            parts.append(f"[{text}]" if lab != -100 else text)
        typer.echo(f"--- {s.where} (trained tokens in [brackets])\n{''.join(parts)}\n")
    typer.echo(format_summary_table(summarize(samples, tok)))


@data_app.command("clean")
@app.command("clean", hidden=True)  # the same command, so recipes name it as `posttrain clean`
def data_clean(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="RECIPE.yaml, or IN... OUT (input files, output folder); then key=value overrides."
        ),
    ] = None,
    decontaminate: Annotated[
        list[str] | None,
        typer.Option("--decontaminate", help="Eval set (data file, `tasks` or `task:NAME`); repeatable."),
    ] = None,
    near_dup_threshold: Annotated[
        float | None, typer.Option("--near-dup-threshold", help="Jaccard threshold of near dedup (0.8).")
    ] = None,
    no_near_dup: Annotated[bool, typer.Option("--no-near-dup", help="Skip near dedup.")] = False,
) -> None:
    """Filter, verify, dedup (exact + MinHash), decontaminate and mix data into OUT (kept, removed, report)."""
    from posttrain.data.quality.clean import clean_command

    clean_command(args or [], decontaminate, near_dup_threshold, no_near_dup)


_USER_OS_ERRORS = {
    errno.EACCES: "check the permissions of that path, or choose a writable output_dir",
    errno.EPERM: "check the permissions of that path, or choose a writable output_dir",
    errno.EROFS: "that file system is read-only: choose another output_dir",
    errno.ENOSPC: "free disk space (or choose an output_dir on a larger disk) and rerun; runs resume",
    errno.EDQUOT: "free space within your disk quota and rerun; runs resume",
    errno.EFBIG: "the file outgrew the allowed file size (ulimit -f): raise the limit and rerun",
}


def main() -> None:
    """Entry point: run the app, turning user errors into one-paragraph messages."""
    try:
        app(standalone_mode=False)
    except PosttrainError as exc:
        if os.environ.get("POSTTRAIN_DEBUG"):
            raise
        typer.secho(f"error: {exc.render()}", err=True, fg="red")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted; the last complete checkpoint is intact", err=True)
        sys.exit(130)
    except OSError as exc:  # permissions, disk full, read-only file system: name the file, no traceback
        if os.environ.get("POSTTRAIN_DEBUG") or exc.errno not in _USER_OS_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        typer.secho(f"error: {where}{exc.strerror}\nFix: {_USER_OS_ERRORS[exc.errno]}", err=True, fg="red")
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except Exception as exc:  # click usage errors arrive as ClickException in non-standalone mode
        # by name: typer may raise its vendored click's classes (typer._click), not click's own
        names = {c.__name__ for c in type(exc).__mro__}
        if "ClickException" in names:
            exc.show()
            sys.exit(exc.exit_code)
        if "Abort" in names:
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
