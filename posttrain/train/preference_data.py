"""Preference data: records -> rendered examples -> shared-prompt batches -> per-response log-probs.

An example is a tuple of rendered samples that share a prompt: (chosen, rejected)
for pairwise losses, (completion, kl) for KTO's unpaired examples, where `kl` is
another example's completion under this prompt (KTO's mismatched pair for its
reference point).

Layout (the "one concatenated forward"): the samples of an example share their
longest common token prefix, which is computed once. With prefix length q the
example becomes one block::

    ids[0 : q-1] | ids_0[q-1 :] | ids_1[q-1 :] | ...       positions 0..q-2 | q-1.. | q-1.. | ...

Every branch restarts at position q-1 and attends to the shared part and to
itself only (a block-causal 4D mask), so each response's log-probs equal those
of its own full sequence. The token at q-1 is repeated in each branch: its
hidden state predicts each branch's first own token; its own label is scored
once, in the first branch. Log-probs are summed per "piece" (the shared part,
then each branch) and a sample's log-prob is its branch plus the shared piece:
tokens both responses share before they diverge are computed once and count
for both. Blocks are packed into rows of ``seq_len`` tokens (or one block per
row when packing is off); ``share_prompt=False`` gives each sample its own
block (the reference layout the tests compare against).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from posttrain.data.collate import IGNORE_INDEX, pack
from posttrain.data.loaders import load_records
from posttrain.data.render import Sample, render_prompt_completion
from posttrain.errors import ConfigError, DataError, ModelError
from posttrain.models.attention import additive, takes_bool_mask
from posttrain.train.lm_loss import token_logprobs

log = logging.getLogger(__name__)


@dataclass
class PreferenceDataConfig:
    """Where preference data comes from and how it is rendered and batched."""

    train: str = "tasks"
    """Preference / ranking records (or prompt-completion records with a boolean `label`, KTO only) in
    JSONL / JSON / Parquet / a saved dataset folder, or `tasks` for pairs generated from the task suite."""
    eval: str | None = "tasks"
    """Held-out preference pairs in the same forms (`tasks` = the suite's test split); null = no eval."""
    tasks: list[str] = field(default_factory=lambda: ["arith", "countdown", "sort"])
    """Task names used when train/eval is `tasks`."""
    levels: list[int] | None = None
    """Difficulty levels to include (null = all levels of each task)."""
    n_per_level: int = 200
    """Training pairs per task and level (tasks only)."""
    eval_n_per_level: int = 10
    """Held-out pairs per task and level (tasks only)."""
    malformed: float = 0.25
    """Share of generated rejected responses that are malformed rather than wrong (tasks only)."""
    step_sep: str = "auto"
    """Separator between reasoning steps in task data; `auto` = `<step>` if the tokenizer has it, else newline."""
    max_len: int = 256
    """Token budget of one prompt + response; longer ones are dropped or truncated (and counted)."""
    truncation: Literal["drop", "truncate"] = "drop"
    """drop the over-long example, or cut the response tail (an example whose prompt alone fills
    the budget is always dropped)."""
    ranking_pairs: Literal["best_worst", "all"] = "best_worst"
    """How a ranking record becomes pairs: best vs worst, or every ordered pair."""
    share_prompt: bool = True
    """Compute the prompt (and any common response prefix) once per example instead of once per response."""
    packing: bool = True
    """Pack examples into rows of train.seq_len tokens; false = one example per row, padded."""
    limit: int | None = None
    """Use only the first N records of a file."""
    seed: int = 0
    """Seed of the task-suite split and of the pair generator."""


@dataclass
class RawExample:
    """An example before rendering: a prompt, its responses and where it came from."""

    prompt: list[dict]
    responses: list[list[dict]]
    where: str
    label: bool | None = None
    """Unpaired examples: whether the (single) response is desirable."""


@dataclass
class Example:
    """Rendered samples sharing one prompt: (chosen, rejected) or (completion, kl)."""

    samples: tuple[Sample, ...]
    where: str
    label: bool | None = None


def resolve_step_sep(tokenizer, step_sep: str) -> str:
    if step_sep != "auto":
        return step_sep
    return "<step>" if "<step>" in tokenizer.get_vocab() else "\n"


def task_raw_examples(cfg: PreferenceDataConfig, split: str, n: int, step_sep: str) -> list[RawExample]:
    from posttrain.data.tasks.pairs import make_pairs

    out = []
    for name in cfg.tasks:
        records = make_pairs(name, split, n, cfg.seed, cfg.levels, step_sep=step_sep, malformed=cfg.malformed)
        for i, r in enumerate(records):
            where = f"task:{name}/{split}/L{r['metadata']['level']}#{i}"
            out.append(RawExample(r["prompt"], [r["chosen"], r["rejected"]], where))
    return out


def file_raw_examples(path: str, limit: int | None, ranking_pairs: str) -> list[RawExample]:
    """Preference, ranking, or labelled prompt-completion records as raw examples."""
    out = []
    for rec in load_records(path, limit=limit):
        d = rec.data
        if rec.kind == "preference":
            out.append(RawExample(d["prompt"], [d["chosen"], d["rejected"]], rec.where))
        elif rec.kind == "ranking":
            order = [d["responses"][i] for i in d["ranking"]]
            pairs = [(0, len(order) - 1)] if ranking_pairs == "best_worst" else None
            pairs = pairs or [(i, j) for i in range(len(order)) for j in range(i + 1, len(order))]
            out += [RawExample(d["prompt"], [order[i], order[j]], f"{rec.where}[{i}>{j}]") for i, j in pairs]
        elif rec.kind == "prompt_completion" and isinstance(d.get("label"), bool):
            out.append(RawExample(d["prompt"], [d["completion"]], rec.where, d["label"]))
        else:
            raise DataError(
                f"preference training needs preference, ranking, or labelled prompt-completion records; "
                f"got a {rec.kind} record"
                + (" without a boolean `label`" if rec.kind == "prompt_completion" else ""),
                where=rec.where,
                fix='write {"prompt", "chosen", "rejected"} records (or {"prompt", "completion", "label": true|false} for KTO)',
            )
    return out


def to_unpaired(raw: list[RawExample]) -> list[RawExample]:
    """KTO's view of the data: each pair gives a desirable (chosen) and an undesirable (rejected) example."""
    out = []
    for r in raw:
        if r.label is not None:
            out.append(r)
        else:
            out.append(RawExample(r.prompt, [r.responses[0]], f"{r.where}:chosen", True))
            out.append(RawExample(r.prompt, [r.responses[-1]], f"{r.where}:rejected", False))
    return out


def add_kl_partners(raw: list[RawExample]) -> list[RawExample]:
    """Append to each unpaired example the completion of the next example with a different prompt."""
    keys = [json.dumps(r.prompt, sort_keys=True) for r in raw]
    n = len(raw)
    out = []
    for i, r in enumerate(raw):
        j = next(((i + d) % n for d in range(1, n) if keys[(i + d) % n] != keys[i]), None)
        if j is None:
            raise DataError(
                "KTO needs at least two different prompts to estimate its reference point",
                where=r.where,
                fix="add examples with other prompts",
            )
        out.append(RawExample(r.prompt, [r.responses[0], raw[j].responses[0]], r.where, r.label))
    return out


def _fit(sample: Sample, max_len: int, truncation: str) -> tuple[Sample | None, str | None]:
    """Apply the token budget to one rendered sample: (sample or None, drop reason or None)."""
    if len(sample.input_ids) <= max_len:
        return sample, None
    first = next((i for i, lab in enumerate(sample.labels) if lab != IGNORE_INDEX), len(sample.labels))
    if first >= max_len:
        return None, "prompt_too_long"
    if truncation == "drop":
        return None, "too_long"
    cut = len(sample.input_ids) - max_len
    return Sample(sample.input_ids[:max_len], sample.labels[:max_len], sample.where, cut), None


def render_examples(
    tokenizer, raw: list[RawExample], max_len: int, truncation: str
) -> tuple[list[Example], dict, list[dict]]:
    """Render and budget every example; returns (kept, stats, dropped [{where, reason}]).

    Drops (counted, listed, never silent): `prompt_too_long`, `too_long` (truncation=drop), and
    `identical` (chosen and rejected render to the same tokens).
    """
    kept, dropped = [], []
    for r in raw:
        samples, reason = [], None
        for resp in r.responses:
            s, reason = _fit(
                render_prompt_completion(tokenizer, r.prompt, resp, where=r.where), max_len, truncation
            )
            if s is None:
                break
            samples.append(s)
        if reason is None and r.label is None and samples[0].input_ids == samples[1].input_ids:
            reason = "identical"
        if reason is not None:
            dropped.append({"where": r.where, "reason": reason})
            continue
        kept.append(Example(tuple(samples), r.where, r.label))
    lengths = [len(s.input_ids) for e in kept for s in e.samples]
    stats = {
        "examples_in": len(raw),
        "examples": len(kept),
        "dropped": dict(Counter(d["reason"] for d in dropped)),
        "truncated": sum(s.n_trunc > 0 for e in kept for s in e.samples),
        "mean_len": sum(lengths) / max(len(lengths), 1),
        "max_len": max(lengths, default=0),
    }
    return kept, stats, dropped


def fingerprint(examples: list[Example]) -> str:
    """A hash of every token and label of every example (guards cached reference log-probs)."""
    h = hashlib.sha256()
    for e in examples:
        for s in e.samples:
            h.update(json.dumps([s.input_ids, s.labels]).encode())
    return h.hexdigest()


def build_examples(cfg: PreferenceDataConfig, tokenizer, split: str, loss: str, unpaired: bool):
    """Load or generate, render and budget one split: (examples, stats with the list of drops).

    unpaired (KTO): pairs become a desirable and an undesirable example, each with a KL partner.
    """
    source = cfg.train if split == "train" else cfg.eval
    if source == "tasks":
        n = cfg.n_per_level if split == "train" else cfg.eval_n_per_level
        step_sep = resolve_step_sep(tokenizer, cfg.step_sep)
        raw = task_raw_examples(cfg, "train" if split == "train" else "test", n, step_sep)
    else:
        raw = file_raw_examples(source, cfg.limit, cfg.ranking_pairs)
    labelled = any(r.label is not None for r in raw)
    if labelled and (split == "eval" or not unpaired):
        raise ConfigError(
            f"loss {loss!r} needs chosen/rejected pairs but {source} holds unpaired labelled examples"
            + (" (eval data must be pairs: preference accuracy compares the two)" if split == "eval" else ""),
            where=f"data.{split}",
            fix="use preference records" + ("" if split == "eval" else ", or loss.name=kto"),
        )
    if unpaired and split == "train":
        raw = add_kl_partners(to_unpaired(raw))
    examples, stats, dropped = render_examples(tokenizer, raw, cfg.max_len, cfg.truncation)
    if not examples:
        raise ConfigError(
            f"every example of {source} was dropped: {stats['dropped']}", fix="raise data.max_len"
        )
    return examples, {**stats, "dropped_list": dropped}


# ---------------------------------------------------------------- layout


@dataclass
class Block:
    """One example laid out as a shared prefix and one branch per sample (see the module docstring)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    branch: list[int]  # -1 = shared prefix, i = sample i's branch
    piece: list[int]  # 0 = shared piece, 1 + i = sample i's own piece
    n_samples: int


def _common_prefix(samples: tuple[Sample, ...]) -> int:
    n = min(len(s.input_ids) for s in samples)
    first = samples[0]
    for k in range(n):
        if any(s.input_ids[k] != first.input_ids[k] or s.labels[k] != first.labels[k] for s in samples[1:]):
            return k
    return n


def layout_example(samples: tuple[Sample, ...], share: bool = True) -> Block:
    """Lay out the samples of one example as one block; `share=False` shares nothing (q = 1)."""
    q = max(1, _common_prefix(samples)) if share else 1
    first = samples[0]
    ids, pos = list(first.input_ids[: q - 1]), list(range(q - 1))
    labels = [IGNORE_INDEX, *first.labels[1 : q - 1]][: q - 1]
    branch, piece = [-1] * (q - 1), [0] * (q - 1)
    for i, s in enumerate(samples):
        n = len(s.input_ids) - (q - 1)
        ids += s.input_ids[q - 1 :]
        pos += range(q - 1, len(s.input_ids))
        # The branch's first token is predicted by the shared part's last token, which only
        # the first branch follows in the row; with no shared part it starts the sequence.
        own_first = s.labels[q - 1] if (i == 0 and q > 1) else IGNORE_INDEX
        labels += [own_first, *s.labels[q:]]
        branch += [i] * n
        piece += [0] + [1 + i] * (n - 1)
    return Block(ids, labels, pos, branch, piece, len(samples))


def collate_blocks(blocks: list[Block], pad_id: int, seq_len: int, packing: bool) -> dict[str, torch.Tensor]:
    """Rows of blocks with a block-causal 4D mask: input_ids, labels, position_ids (R, T),
    attention_mask (R, 1, T, T) bool (True = attend), piece (R, T) and sample_pieces (S, 2),
    samples in block order then branch order."""
    groups = [r.sample_ids for r in pack(blocks, seq_len)] if packing else [[i] for i in range(len(blocks))]
    base = [0]
    for b in blocks:
        base.append(base[-1] + b.n_samples + 1)
    width = max(sum(len(blocks[i].input_ids) for i in g) for g in groups)
    shape = (len(groups), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    pos, piece = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    blk, br = torch.full(shape, -1, dtype=torch.long), torch.full(shape, -1, dtype=torch.long)
    for r, g in enumerate(groups):
        start = 0
        for i in g:
            b, end = blocks[i], start + len(blocks[i].input_ids)
            ids[r, start:end], labels[r, start:end] = torch.tensor(b.input_ids), torch.tensor(b.labels)
            pos[r, start:end], br[r, start:end] = torch.tensor(b.position_ids), torch.tensor(b.branch)
            piece[r, start:end], blk[r, start:end] = torch.tensor(b.piece) + base[i], i
            start = end
        pos[r, start:] = torch.arange(width - start)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_branch = (br[:, None, :] == -1) | (br[:, :, None] == br[:, None, :])
    mask = (blk[:, :, None] == blk[:, None, :]) & same_branch & causal
    sample_pieces = torch.tensor(
        [[base[i], base[i] + 1 + k] for i, b in enumerate(blocks) for k in range(b.n_samples)]
    )
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "attention_mask": mask[:, None],
        "piece": piece,
        "sample_pieces": sample_pieces,
    }


class ExamplePlan:
    """Deterministic batches of examples: epoch e's order depends only on (seed, e).

    Each batch holds `batch_size` examples (collated with `collate_blocks`) plus
    `example_index` (E,) into the example list and, for unpaired data, `desirable` (E,).
    """

    def __init__(
        self,
        examples: list[Example],
        indices: list[int],
        batch_size: int,
        seq_len: int,
        packing: bool,
        share: bool,
        pad_id: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.examples, self.indices, self.batch_size = examples, list(indices), batch_size
        self.seq_len, self.packing, self.pad_id, self.seed, self.shuffle = (
            seq_len,
            packing,
            pad_id,
            seed,
            shuffle,
        )
        self.blocks = {i: layout_example(examples[i].samples, share) for i in self.indices}
        longest = max((len(b.input_ids) for b in self.blocks.values()), default=0)
        if packing and longest > seq_len:
            raise ConfigError(
                f"train.seq_len={seq_len} is shorter than the longest laid-out example ({longest} tokens)",
                where="train.seq_len",
                fix=f"raise train.seq_len to at least {longest} (about 2 x data.max_len), or set data.packing=false",
            )
        self._cache: dict[int, list] = {}

    def epoch(self, e: int) -> list[dict[str, torch.Tensor]]:
        if e not in self._cache:
            self._cache = {e: self._build(e)}
        return self._cache[e]

    def _build(self, e: int) -> list[dict[str, torch.Tensor]]:
        order = list(self.indices)
        if self.shuffle:
            random.Random(self.seed * 1000003 + e).shuffle(order)
        return [self.collate(order[k : k + self.batch_size]) for k in range(0, len(order), self.batch_size)]

    def collate(self, chunk: list[int]) -> dict[str, torch.Tensor]:
        """One batch of the examples `chunk` (indices into the example list), in that order; a
        distributed step re-collates its rank's share of a global batch with it."""
        batch = collate_blocks([self.blocks[i] for i in chunk], self.pad_id, self.seq_len, self.packing)
        batch["example_index"] = torch.tensor(chunk)
        if self.examples[chunk[0]].label is not None:
            batch["desirable"] = torch.tensor([bool(self.examples[i].label) for i in chunk])
        return batch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def _attention_mask(model, mask: torch.Tensor) -> torch.Tensor:
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if takes_bool_mask(model):
        return mask
    if impl == "eager":
        return additive(mask, next(model.parameters()).dtype)
    raise ModelError(
        f"preference batches need a custom 4D attention mask, which attn_implementation={impl!r} does not take",
        fix="load the model with attn_implementation='sdpa' (the default) or 'eager'",
    )


def example_logprobs(
    model, batch: dict[str, torch.Tensor], chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts per sample ((S,), (S,)), differentiable.

    Samples are ordered example-major (example 0's samples, then example 1's, ...).
    """
    inputs = {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": batch["position_ids"],
        "attention_mask": _attention_mask(model, batch["attention_mask"]),
    }
    logp, _, _ = token_logprobs(model, inputs, chunk_size=chunk_size)
    piece = batch["piece"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
    sp = batch["sample_pieces"]
    n = int(sp.max()) + 1
    sums = logp.new_zeros(n).index_add(0, piece, logp)
    counts = torch.bincount(piece, minlength=n)
    return sums[sp[:, 0]] + sums[sp[:, 1]], counts[sp[:, 0]] + counts[sp[:, 1]]


# ---------------------------------------------------------------- reference log-probs


def reference_context(model):
    """pi_ref for PEFT adapters: the same weights with the adapter switched off."""
    is_peft = hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
    return model.disable_adapter() if is_peft else nullcontext()


@torch.no_grad()
def score_examples(model, plan: ExamplePlan, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """pi_ref summed log-probs and token counts of every response of `plan`'s examples ((N, k), (N, k))."""
    device = next(model.parameters()).device
    n, k = len(plan.examples), len(plan.examples[0].samples)
    sums, counts = torch.zeros(n, k), torch.zeros(n, k, dtype=torch.long)
    was_training = model.training
    model.eval()
    with reference_context(model):
        for b in plan.epoch(0):
            s, c = example_logprobs(model, {k_: v.to(device) for k_, v in b.items()}, chunk_size)
            sums[b["example_index"]], counts[b["example_index"]] = (
                s.float().cpu().view(-1, k),
                c.cpu().view(-1, k),
            )
    model.train(was_training)
    return sums, counts


def cached_scores(path: Path, examples: list[Example], compute) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute()` once: its result is stored at `path` (atomically) with a hash of the examples'
    tokens and reused while the hash matches (resume, re-runs)."""
    key = fingerprint(examples)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["fingerprint"] == key:
            log.info("reference log-probs: reusing %s", path)
            return saved["sums"], saved["counts"]
        log.warning("%s was computed for other data; recomputing", path)
    sums, counts = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"fingerprint": key, "sums": sums, "counts": counts}, tmp)
    os.replace(tmp, path)
    return sums, counts
