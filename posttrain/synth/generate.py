"""`posttrain generate`: sample k completions per prompt from a model folder into JSONL.

One JSON line per prompt (`generation_record`)::

    {"index": i, "prompt": [messages], "metadata": {scorer, ground_truth, level, task, ...},
     "prompt_ids": [...], "model": path,
     "sampling": {n, temperature, top_p, top_k, max_new_tokens, stop, seed, chunk_seed},
     "completions": [{"text", "token_ids", "logprobs", "finish_reason", "num_tokens"}, ...]}

``logprobs[t]`` = log softmax(logits_t / T)[token_t], before top-k / top-p truncation (the
rollout engine's convention, `posttrain.rollout.engine`); at T = 1 their sum is the model's
log-probability of the completion. ``finish_reason``: ``stop`` (eos, stop id or stop string)
or ``length`` (hit max_new_tokens).

Prompts come from the task suite (`posttrain.data.tasks.task_problems`: its records name the
task as ``metadata.scorer``) or from any file the data layer reads: prompt, prompt+completion,
preference and ranking records give their ``prompt``; chat records give the messages before
their last assistant turn (that turn is kept as ``metadata.reference``).

Determinism and resume: prompts are generated in chunks of ``chunk_prompts``; chunk c is
sampled with seed ``chunk_seed(seed, c)``, so a run is a function of (model, prompts, recipe).
Finished chunks are appended to ``generations.jsonl.partial`` (flushed and fsynced); a rerun
with the same inputs continues after the last complete chunk, and the finished file appears
only at the end (``os.replace``). A rerun after completion with the same model files, prompts
and settings does nothing and returns the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.config import to_dict
from posttrain.errors import ConfigError, DataError
from posttrain.monitor.logger import console
from posttrain.train.loop import ModelConfig

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
META_FILE = "generate_meta.json"
_PROMPT_KEYS = {"prompt", "completion", "chosen", "rejected", "responses", "ranking", "messages", "metadata"}


@dataclass
class PromptsConfig:
    """Which prompts to sample."""

    prompts: str = "tasks"
    """`tasks` (the task suite) or a JSONL / JSON / Parquet file / saved dataset of any record kind."""
    tasks: list[str] = field(default_factory=lambda: ["arith"])
    """Task names when prompts is `tasks`."""
    split: Literal["train", "test"] = "train"
    """Task-suite split (test = the held-out problems)."""
    levels: list[int] | None = None
    """Difficulty levels to draw (null = every level of each task)."""
    n_per_level: int = 20
    """Problems per task and level (tasks only)."""
    limit: int | None = None
    """Use only the first N prompts (tasks or file)."""
    seed: int = 0
    """Seed of the task-suite split."""


@dataclass
class GenSamplingConfig:
    """How completions are sampled (`posttrain.rollout.sampling.SamplingParams`)."""

    n: int = 4
    """Completions per prompt (k)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (then n > 1 repeats the same completion)."""
    top_p: float = 1.0
    """Nucleus mass; 1.0 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    max_new_tokens: int = 128
    """Generation budget per completion."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (kept in the completion)."""
    seed: int = 0
    """Sampling seed; chunk c samples with `chunk_seed(seed, c)`."""


@dataclass
class GenerateRecipe:
    """`posttrain generate RECIPE.yaml`: every key of a generation run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: GenSamplingConfig = field(default_factory=GenSamplingConfig)
    backend: str = "hf"
    """Rollout backend: hf (any device) | vllm (CUDA, the `[gpu]` extra) | a registered one."""
    max_batch_rows: int = 256
    """hf backend: prompts x n rows decoded together."""
    precision: str = "auto"
    """hf backend: ``auto`` (bf16 where the hardware computes it natively, else fp32;
    `posttrain.train.precision`), ``fp32`` (log-probs exact to the model's fp32 forward) or ``bf16``.
    The choice is recorded in generate_meta.json."""
    chunk_prompts: int = 32
    """Prompts per resumable chunk (each chunk is written as soon as it is done)."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)."""
    output_dir: str = "runs/generate"
    """Run folder: generations.jsonl, generate_meta.json."""

    def validate(self) -> None:
        if self.chunk_prompts < 1 or self.max_batch_rows < 1:
            raise ConfigError("chunk_prompts and max_batch_rows must be >= 1", where="chunk_prompts")
        self.sampling_params()  # range checks with the sampling.* key named

    def sampling_params(self, seed: int | None = None):
        """The `SamplingParams` of this recipe (``seed`` = a chunk's seed)."""
        from posttrain.rollout.sampling import SamplingParams

        s = self.sampling
        try:
            return SamplingParams(
                n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                max_new_tokens=s.max_new_tokens, stop=list(s.stop),
                seed=s.seed if seed is None else seed, source="posttrain generate recipe",
            )  # fmt: skip
        except ConfigError as exc:
            raise ConfigError(
                exc.message, where=f"sampling.{exc.where.split('.')[-1]}", fix=exc.fix
            ) from None


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk ``chunk``: every chunk its own stream, replayed on resume."""
    return (seed * 1_000_003 + chunk * 7_919 + 1) % (2**62)


# ---------------------------------------------------------------- prompts


def load_prompts(cfg: PromptsConfig) -> list[dict]:
    """Prompt records ``{"prompt": [messages], "metadata": {...}}`` (module docstring)."""
    if cfg.prompts == "tasks":
        from posttrain.data.tasks import task_problems

        problems = task_problems(cfg.tasks, cfg.split, cfg.n_per_level, cfg.seed, cfg.levels)
        records = [p.prompt_record() for p in problems][: cfg.limit]
    else:
        from posttrain.data.loaders import load_records

        records = [prompt_of(r.data, r.kind, r.where) for r in load_records(cfg.prompts, limit=cfg.limit)]
    if not records:
        raise DataError("no prompts to sample", where=f"data.prompts={cfg.prompts}", fix="check data.*")
    return records


def prompt_of(data: dict, kind: str, where: str) -> dict:
    """The prompt record of one validated record of any kind (module docstring)."""
    extra = {k: v for k, v in data.items() if k not in _PROMPT_KEYS}
    meta = {**extra, **(data.get("metadata") or {}), "source": where}
    if kind != "chat":
        if kind == "prompt_completion":
            meta.setdefault("reference", data["completion"][-1]["content"])
        return {"prompt": data["prompt"], "metadata": meta}
    messages = data["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise DataError("chat record starts with its assistant turn: no prompt", where=where)
    meta.setdefault("reference", messages[last].get("content", ""))
    return {"prompt": messages[:last], "metadata": meta}


# ---------------------------------------------------------------- records


def generation_record(index: int, prompt: dict, completions: list, sampling: dict, model: str) -> dict:
    """One output line: a prompt and its k completions (`Completion`s of one prompt, in order)."""
    return {
        "index": index,
        "prompt": prompt["prompt"],
        "metadata": prompt.get("metadata", {}),
        "prompt_ids": list(completions[0].prompt_ids),
        "model": model,
        "sampling": sampling,
        "completions": [
            {
                "text": c.text,
                "token_ids": list(c.token_ids),
                "logprobs": [float(x) for x in c.logprobs],
                "finish_reason": c.finish_reason,
                "num_tokens": len(c.token_ids),
            }
            for c in completions
        ],
    }


def read_generations(path: str | os.PathLike) -> list[dict]:
    """The records of a generations file; a line that is not one is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError("generations file not found", where=str(path), fix="run `posttrain generate` first")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON: {err.msg}", where=f"{path}:{lineno}") from None
            if (
                not isinstance(row, dict)
                or not {"prompt", "completions"} <= set(row)
                or not row["completions"]
            ):
                raise DataError(
                    "not a generation record (needs a prompt and a non-empty completions list)",
                    where=f"{path}:{lineno}",
                    fix="pass a file written by `posttrain generate`",
                )
            out.append(row)
    return out


# ---------------------------------------------------------------- run


def model_fingerprint(path: str) -> list:
    """(name, size, mtime) of the model folder's files: a retrained model at the same path differs."""
    p = Path(path)
    if not p.is_dir():
        return [str(path)]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()]


def run_key(recipe: GenerateRecipe, model_path: str, prompts: list[dict]) -> str:
    """What the output depends on: settings (not output_dir / threads), model files, prompts."""
    cfg = {k: v for k, v in to_dict(recipe).items() if k not in ("output_dir", "threads")}
    blob = json.dumps([cfg, model_fingerprint(model_path), prompts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _resume_point(partial: Path, meta: dict, key: str, chunk: int) -> int:
    """Prompts already done in ``partial`` (whole chunks of complete lines) when it was written
    for ``key``; the file is cut back to that point. 0 (and no file) otherwise."""
    if not partial.is_file() or meta.get("key") != key:
        partial.unlink(missing_ok=True)
        return 0
    data = partial.read_bytes()
    lines = data.count(b"\n")
    done, keep = lines - lines % chunk, 0
    for _ in range(done):
        keep = data.index(b"\n", keep) + 1
    with partial.open("r+b") as f:
        f.truncate(keep)
    return done


def _engine(recipe: GenerateRecipe, model_path: str):
    from posttrain.rollout.engine import get_engine

    m = recipe.model
    if recipe.backend == "hf":
        return get_engine("hf", model=model_path, max_batch_rows=recipe.max_batch_rows, dtype=m.dtype,
                          device=m.device, precision=recipe.precision)  # fmt: skip
    return get_engine(recipe.backend, model=model_path, dtype=m.dtype)


def run_generate(recipe: GenerateRecipe) -> Path:
    """Sample ``sampling.n`` completions of every prompt; returns the generations.jsonl path."""
    import torch

    from posttrain.train.loop import resolve_model_path

    if recipe.threads > 0:
        torch.set_num_threads(recipe.threads)
    recipe.validate()
    out_dir = Path(recipe.output_dir)
    out, partial, meta_file = (
        out_dir / GENERATIONS_FILE,
        out_dir / f"{GENERATIONS_FILE}.partial",
        out_dir / META_FILE,
    )
    prompts = load_prompts(recipe.data)
    model_path = resolve_model_path(recipe.model.path)
    key = run_key(recipe, model_path, prompts)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if out.is_file() and meta.get("key") == key and meta.get("complete"):
        console.print(f"generate: {out} is complete for this model and recipe; skipped")
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _resume_point(partial, meta, key, recipe.chunk_prompts)
    if done:
        console.print(f"generate: resuming after {done} of {len(prompts)} prompts")
    _write_json(meta_file, {"key": key, "complete": False, "model": model_path, "prompts": len(prompts)})
    engine, t0 = _engine(recipe, model_path), time.perf_counter()
    with partial.open("a", encoding="utf-8") as f:
        for start in range(done, len(prompts), recipe.chunk_prompts):
            batch = prompts[start : start + recipe.chunk_prompts]
            seed = chunk_seed(recipe.sampling.seed, start // recipe.chunk_prompts)
            params = recipe.sampling_params(seed)
            completions = engine.generate(batch, params)
            sampling = {**params.to_metadata(), "seed": recipe.sampling.seed, "chunk_seed": seed}
            del sampling["source"]
            n = params.n
            for j, rec in enumerate(batch):
                row = generation_record(
                    start + j, rec, completions[j * n : (j + 1) * n], sampling, model_path
                )
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            console.print(f"generate: {start + len(batch)}/{len(prompts)} prompts")
    os.replace(partial, out)
    stats = generation_stats(read_generations(out), time.perf_counter() - t0)
    used = getattr(engine, "precision", None)
    _write_json(meta_file, {"key": key, "complete": True, "model": model_path, "prompts": len(prompts),
                            "precision": used, **stats})  # fmt: skip
    console.print(
        f"generate: {stats['completions']} completions of {stats['prompts']} prompts -> {out} "
        f"(mean {stats['mean_tokens']:.1f} tokens, {stats['stop_fraction']:.0%} stopped)"
    )
    return out


def generation_stats(rows: list[dict], seconds: float) -> dict[str, float]:
    """Counts of a generations file: prompts, completions, tokens, the stopped fraction."""
    comps = [c for r in rows for c in r["completions"]]
    tokens = sum(c["num_tokens"] for c in comps)
    return {
        "prompts": len(rows),
        "completions": len(comps),
        "tokens": tokens,
        "mean_tokens": tokens / max(1, len(comps)),
        "stop_fraction": sum(c["finish_reason"] == "stop" for c in comps) / max(1, len(comps)),
        "seconds_this_run": seconds,
    }


def generate_main(recipe_path: str | None, overrides: list[str]) -> Path:
    from posttrain.config import load_recipe

    return run_generate(load_recipe(GenerateRecipe, recipe_path, overrides))
