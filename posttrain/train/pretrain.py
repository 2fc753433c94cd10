"""Pretraining a tiny model from scratch on the task suite: the embedded default.

No model hub is reachable, so the project makes its own default model: a
corpus of worked problems from the task suite (plain text, no chat markup:
`question \\n <think>steps</think>\\nAnswer: x`), exact-deduplicated and mixed
across tasks by configured ratios; a byte-level BPE tokenizer trained on it
(digits single tokens, chat and think markers single tokens); a Qwen2- or
Llama-architecture model built from a transformers config; next-token
training on packed rows. Deterministic by seed. The result is cached by a
hash of its recipe, so later runs (and `model.path: default`) reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from posttrain.config import to_dict
from posttrain.data.render import Sample
from posttrain.data.sft_data import BatchPlan
from posttrain.data.tasks.audit import MANIFEST_FILE, write_corpus
from posttrain.distributed import trainer as dist
from posttrain.distributed.config import DistributedConfig
from posttrain.distributed.launch import env_world
from posttrain.distributed.parallel import all_reduce_sum, is_main
from posttrain.errors import ConfigError
from posttrain.monitor.logger import console
from posttrain.train.anomaly import AnomalyConfig
from posttrain.train.loop import LoopConfig, prepare_run, run_loop
from posttrain.train.optim import OptimConfig

CORPUS_VERSION = 3
"""Bumped whenever the corpus rule changes, so cached defaults of an older rule are not reused
(2: test questions of every task excluded, corpus.jsonl.gz and its manifest written; 3: decontaminated
through data clean, which also drops documents that begin with a whole test question)."""


@dataclass
class TinyModelConfig:
    """Architecture of the model built from scratch."""

    arch: Literal["qwen2", "llama"] = "qwen2"
    """Model family of the config (Qwen2 has q/k/v biases, so BitFit works on it)."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    vocab_size: int = 1024
    """Target vocabulary size of the tokenizer trained on the corpus."""
    tie_embeddings: bool = True


@dataclass
class CorpusConfig:
    """The pretraining corpus generated from the task suite."""

    tasks: list[str] = field(default_factory=lambda: ["arith", "countdown", "sort"])
    """Task sources."""
    mix: dict[str, float] = field(default_factory=lambda: {"arith": 2.0})
    """Sampling ratio per task (missing tasks get 1.0); documents are drawn to these proportions."""
    n_docs: int = 24000
    """Documents after mixing."""
    levels: list[int] | None = None
    """Difficulty levels to draw from (null = all)."""
    exclude_test: bool = True
    """Decontaminate against every registered task's test split through data clean
    (`data.quality.decontam`, whole split): a document whose question is, or begins with, a test
    question is dropped; false rebuilds the contaminated corpora of before."""


@dataclass
class PretrainRecipe:
    """`posttrain pretrain RECIPE.yaml`: every key of a pretraining recipe."""

    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=0.01, warmup_steps=30, min_lr_ratio=0.1)
    )
    train: LoopConfig = field(
        default_factory=lambda: LoopConfig(max_steps=700, batch_size=8, seq_len=256, precision="fp32")
    )
    """fp32 by default: the embedded default model is then the same on every CPU kind (with auto, a
    CPU with native bf16 would pretrain a different model under the same cache key)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes (DDP / FSDP2) under `torchrun` or with `distributed.nproc=2`; not part of the
    cache key (the same global batch at any world size)."""
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """Loss divergence and grad-norm spikes, and what then (`posttrain.train.anomaly`); not part of
    the cache key (it decides whether a run stops, not what a finished run learned)."""
    output_dir: str = "default"
    """Run directory; `default` = the embedded-default cache (~/.cache/posttrain or $POSTTRAIN_CACHE)."""
    seed: int = 0
    resume: bool = True
    force: bool = False
    """Retrain even if a finished run with the same recipe exists."""


LOGGING_ONLY = ("loggers",)
"""Train keys left out of the cache key (they choose where metrics go, not what is learned)."""


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def recipe_key(cfg: PretrainRecipe) -> str:
    """Cache key: the recipe (less output_dir/force/resume and the `LOGGING_ONLY` train keys) and
    `CORPUS_VERSION`. Logging settings do not change the weights: adding one keeps old caches valid."""
    plain = PretrainRecipe(**{**cfg.__dict__, "output_dir": "default", "force": False, "resume": True})
    raw = to_dict(plain)
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in LOGGING_ONLY}
    raw.pop("distributed", None)
    raw.pop("anomaly", None)
    body = yaml.safe_dump(raw, sort_keys=False)
    return hashlib.sha256(f"corpus-v{CORPUS_VERSION}\n{body}".encode()).hexdigest()[:12]


def resolve_output_dir(cfg: PretrainRecipe) -> Path:
    if cfg.output_dir == "default":
        return cache_root() / f"default-{recipe_key(cfg)}"
    return Path(cfg.output_dir)


def corpus_records(
    cfg: CorpusConfig, seed: int, step_sep: str = "<step>"
) -> tuple[list[dict], dict[str, int]]:
    """Documents drawn from each task in proportion to `mix`, exact-deduplicated, decontaminated, shuffled.

    With `exclude_test`, every drawn document goes through data clean's decontamination against
    every registered task's test split (`data.quality.decontam`, `whole_split` on): a document is
    dropped, and another drawn in its place, when a line of it is or begins with a test question, or
    holds one of the sampled test questions' n-grams. Returns one record per document (task, level,
    question, text) and the distinct documents dropped, by what matched (``test split``, ``exact
    question``, ``N-gram``)."""
    from posttrain.data.quality.decontam import DecontamConfig, build_index
    from posttrain.data.tasks import get_task

    unknown = set(cfg.mix) - set(cfg.tasks)
    if unknown:
        raise ConfigError(
            f"corpus.mix names tasks not in corpus.tasks: {sorted(unknown)}", where="corpus.mix"
        )
    index = build_index(DecontamConfig(evals=["tasks"])) if cfg.exclude_test else None
    rng = random.Random(seed)
    weights = [cfg.mix.get(t, 1.0) for t in cfg.tasks]
    quota = {t: round(cfg.n_docs * w / sum(weights)) for t, w in zip(cfg.tasks, weights, strict=True)}
    records: list[dict] = []
    dropped: dict[str, str] = {}  # document -> what matched
    for name, n in quota.items():
        task = get_task(name)
        levels = [lv for lv in task.levels if cfg.levels is None or lv in cfg.levels]
        seen: set[str] = set()
        for _ in range(n * 20):  # bounded: tiny levels have few distinct problems
            if len(seen) >= n:
                break
            p = task.generate(rng, rng.choice(levels))
            doc = f"{p.question}\n{p.response(step_sep=step_sep)}"
            if doc in seen or doc in dropped:
                continue
            if index is not None and (found := index.find(doc, p.question)) is not None:
                dropped[doc] = found["match"]
                continue
            seen.add(doc)
            records.append({"task": name, "level": p.level, "question": p.question, "text": doc})
    rng.shuffle(records)
    return records, dict(sorted(Counter(dropped.values()).items()))


def build_corpus(cfg: CorpusConfig, seed: int, step_sep: str = "<step>") -> list[str]:
    """The documents of `corpus_records`."""
    return [r["text"] for r in corpus_records(cfg, seed, step_sep)[0]]


def build_model(cfg: TinyModelConfig, tokenizer) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Qwen2Config(**common) if cfg.arch == "qwen2" else LlamaConfig(**common)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (a ``.<name>.lock`` file beside it) while building it.

    Concurrent processes that need the same model (tests each calling `ensure_default_model`)
    then build it once: the others wait, and find the finished model when they get the lock."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for another process that is building {out}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_pretrain(cfg: PretrainRecipe) -> Path:
    """Train (or reuse) the model; returns its `final/` HF folder. One process at a time builds a
    given output dir (`build_lock`)."""
    out = resolve_output_dir(cfg)
    final = out / "final"
    several = env_world() > 1 and not dist.in_one_process()
    if several:  # under torchrun: rank 0 holds the lock and decides for every rank
        dist.join(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    with build_lock(out) if is_main() else contextlib.nullcontext():
        done = (final / "config.json").is_file() and not cfg.force
        if several:  # every rank follows rank 0's look at the folder
            done = all_reduce_sum([1.0 if done and is_main() else 0.0])[0] > 0
        if done:
            console.print(f"reusing pretrained model {final} (set force=true to retrain)")
            return final
        cfg.output_dir = str(out)
        return _pretrain(cfg, out)


def _pretrain(cfg: PretrainRecipe, out: Path) -> Path:
    from posttrain.models.load import save_hf_folder
    from posttrain.models.tokenizer import EOS_TOKEN, train_default_tokenizer

    final = out / "final"
    records, dropped = corpus_records(cfg.corpus, cfg.seed)
    write_corpus(out, records, cfg.corpus, cfg.seed, dropped)
    docs = [r["text"] for r in records]
    tokenizer = train_default_tokenizer(docs, vocab_size=cfg.model.vocab_size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer)
    run = prepare_run(cfg, str(out), cfg.seed, None, cfg.train, model=model, tokenizer=tokenizer)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    samples = []
    for i, doc in enumerate(docs):
        ids = (tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos])[: cfg.train.seq_len]
        samples.append(Sample(input_ids=ids, labels=list(ids), where=f"corpus:{i}"))
    n_tok = sum(len(s.input_ids) for s in samples)
    console.print(f"pretraining corpus: {len(samples)} documents, {n_tok} tokens, vocab {len(tokenizer)}")
    plan = BatchPlan(samples, cfg.train.batch_size, cfg.train.seq_len, True, tokenizer.pad_token_id, cfg.seed)
    model = run_loop(run, model, plan, cfg.optim, cfg.train, anomaly=cfg.anomaly)
    gen = {"do_sample": False, "eos_token_id": eos}
    save = lambda m: save_hf_folder(m, tokenizer, final, generation_config=gen)  # noqa: E731
    dist.export_final(model, save, final)  # rank 0 writes (FSDP: the gathered weights)
    if is_main():
        shutil.copy2(out / MANIFEST_FILE, final / MANIFEST_FILE)
    run.finish(final)
    return final


def pretrain_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """`posttrain pretrain RECIPE.yaml [key=value ...]` (distributed.nproc > 1 launches torchrun)."""
    from posttrain.config import load_recipe
    from posttrain.distributed.launch import run_command

    cfg = load_recipe(PretrainRecipe, recipe_path, overrides)
    return run_command("pretrain", recipe_path, overrides, cfg, run_pretrain)


def ensure_default_model() -> Path:
    """The embedded default model's folder, pretraining it on first use (a few minutes, once)."""
    cfg = PretrainRecipe()
    final = resolve_output_dir(cfg) / "final"
    if not (final / "config.json").is_file():
        console.print(f"[bold]building the embedded default model[/bold] (once; cached in {final.parent})")
        with dist.one_process():  # also under torchrun: a build of its own, before any process group
            run_pretrain(cfg)
    return final
