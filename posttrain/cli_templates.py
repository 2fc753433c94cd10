"""`posttrain templates ...`: lint a chat template, add single-token tags, export per-turn samples.

Thin wrappers over `posttrain.data.templates`; mounted by `posttrain.cli` as
``app.add_typer(templates_app, name="templates")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

templates_app = typer.Typer(no_args_is_help=True, help="Inspect and fix chat templates.")

ModelDir = Annotated[str, typer.Argument(help="Model or tokenizer folder, or `default`.")]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _resolve(path: str) -> str:
    from posttrain.train.loop import resolve_model_path

    return resolve_model_path(path)


@templates_app.command("lint")
def lint(
    model_dir: ModelDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    think_tags: Annotated[str, typer.Option(help="Comma-separated think tags.")] = "<think>,</think>",
    step_sep: Annotated[str, typer.Option(help="Process-reward step separator ('' to skip).")] = "<step>",
) -> None:
    """Report how the think tags tokenise, the generation prompt, end-of-turn, prefix preservation."""
    from posttrain.data.templates import lint_template
    from posttrain.models.load import load_tokenizer

    path = _resolve(model_dir)
    report = lint_template(
        load_tokenizer(path), tuple(_split(think_tags)), step_sep or None, model_hint=model_dir
    )
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else report.format())


@templates_app.command("add-tokens")
def add_tokens_cmd(
    model_dir: ModelDir,
    out_dir: Annotated[Path, typer.Argument(help="Where to write the model with the new tokens.")],
    tokens: Annotated[str, typer.Option(help="Comma-separated tokens to add.")] = "<think>,</think>",
    special: Annotated[bool, typer.Option(help="Add as special tokens (dropped when decoding).")] = False,
) -> None:
    """Add single-token tags, resize embeddings (new rows = mean embedding), save an HF folder."""
    from posttrain.data.templates import add_tokens, tag_info
    from posttrain.models.load import load_model, load_tokenizer, save_hf_folder

    path = _resolve(model_dir)
    tok = load_tokenizer(path)
    model, tok, added = add_tokens(
        load_model(path, dtype="float32", tokenizer=tok), tok, _split(tokens), special
    )
    save_hf_folder(model, tok, out_dir)
    for tag in _split(tokens):
        info = tag_info(tok, tag)
        state = "added" if tag in added else "already present"
        typer.echo(f"{tag}: {state}, {info.n_tokens} token(s) {info.pieces}")
    typer.echo(f"wrote {out_dir} (vocabulary {len(tok)})")


@templates_app.command("per-turn")
def per_turn(
    model: Annotated[str, typer.Option(help="Model or tokenizer folder whose template renders the data.")],
    input: Annotated[Path, typer.Option(help="Chat records (JSONL / JSON / Parquet).")],
    output: Annotated[Path, typer.Option(help="JSONL: one line per assistant turn.")],
) -> None:
    """Write one template-faithful prompt/completion pair per assistant turn."""
    from posttrain.data.loaders import load_records, write_jsonl
    from posttrain.data.templates import per_turn_examples
    from posttrain.models.load import load_tokenizer

    tok = load_tokenizer(_resolve(model))
    records = load_records(input, kind="chat")
    rows = [
        row
        for rec in records
        for row in per_turn_examples(tok, rec.data["messages"], rec.where, rec.data.get("tools"))
    ]
    n = write_jsonl(output, rows)
    typer.echo(f"{output}: {n} per-turn samples from {len(records)} conversations")
