"""The teacher side of distillation: tokenizer compatibility, logits at the trained positions,
prompts for sampling, and the top-k cache that lets logit KD run without the teacher in memory.

Top-k cache: for every training sample (in `build_samples` order) and every position whose next
token is trained, the teacher's k most likely next tokens and their log-probs (temperature 1, full
softmax). Stored as one safetensors file (``indices`` (N, k) int32, ``logprobs`` (N, k) float32,
``offsets`` (S + 1,) int64: sample s owns rows offsets[s]:offsets[s+1]) plus ``meta.json``; it is
reused only when its meta (teacher path and weight-file stats, k, a hash of the samples) matches.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.data.collate import pad_collate
from posttrain.data.render import Sample
from posttrain.data.sft_data import DataConfig
from posttrain.errors import ConfigError, DataError
from posttrain.train.lm_loss import loss_targets, selected_hidden, supports_fused_head


def check_same_tokenizer(teacher_tok: Any, student_tok: Any, teacher_path: str, student_path: str) -> None:
    """Logit-level distillation compares distributions token id by token id: both vocabularies
    (token -> id) and the pad / eos ids must be equal, else a ConfigError naming both folders."""
    problems = []
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:3]
        problems.append(f"vocabularies differ ({len(tv)} vs {len(sv)} tokens; e.g. {diff})")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            problems.append(f"{name} {getattr(teacher_tok, name)} vs {getattr(student_tok, name)}")
    if problems:
        raise ConfigError(
            f"teacher {teacher_path} and student {student_path} have different tokenizers: "
            + "; ".join(problems),
            where="teacher.path / student.path",
            fix="use mode=sequence (distils through text, any tokenizers) or a pair sharing one tokenizer",
        )


def labelled_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    """Logits (N, vocab) at the positions whose next token is labelled, row-major (as `loss_targets`).

    Only those positions reach the LM head when the head is a plain matmul; columns past the
    tokenizer's ``vocab`` (embedding padding) are dropped so teacher and student line up.
    """
    if supports_fused_head(model):
        h, _, _, weight = selected_hidden(model, batch)
        return (h @ weight.t())[:, :vocab]
    mask, _, _ = loss_targets(batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    full = model(**inputs, use_cache=False).logits[:, -batch["input_ids"].shape[1] :]
    return full[:, :-1][mask][:, :vocab]


def prompt_records(data: DataConfig) -> list[dict]:
    """Prompts ``{"prompt": [messages], "metadata": ...}`` of the training data: the task suite's
    train split, a file of prompt records, or a chat / prompt_completion file (the messages before
    the last assistant turn; the prompt)."""
    if data.train == "tasks":
        from posttrain.data.tasks import task_problems

        return [
            p.prompt_record()
            for p in task_problems(data.tasks, "train", data.n_per_level, data.seed, data.levels)
        ]
    from posttrain.data.loaders import load_records

    out = []
    for rec in load_records(data.train, limit=data.limit):
        if rec.kind == "prompt":
            out.append(rec.data)
        elif rec.kind == "prompt_completion":
            out.append({"prompt": rec.data["prompt"]})
        elif rec.kind == "chat":
            msgs = rec.data["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
            if last == 0:
                raise DataError("a chat record starts with the assistant turn: no prompt", where=rec.where)
            out.append({"prompt": msgs[:last]})
        else:
            raise DataError(
                f"{rec.kind} records hold no prompts to distil on",
                where=rec.where,
                fix="use prompt, chat or prompt_completion records",
            )
    if not out:
        raise DataError("no prompts", where=data.train, fix="point data.train at a non-empty file")
    return out


@dataclass
class TopK:
    """The teacher's top-k per trained position of each sample (module docstring)."""

    indices: torch.Tensor
    """(N, k) int32 token ids, most likely first."""
    logprobs: torch.Tensor
    """(N, k) float32 log-probs of those tokens under the full softmax."""
    offsets: torch.Tensor
    """(S + 1,) int64: sample s owns rows offsets[s]:offsets[s + 1]."""

    def rows(self, sample_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, logprobs) of these samples' positions, concatenated in this order."""
        parts = [slice(int(self.offsets[i]), int(self.offsets[i + 1])) for i in sample_ids]
        return torch.cat([self.indices[p] for p in parts]).long(), torch.cat(
            [self.logprobs[p] for p in parts]
        )


@torch.no_grad()
def teacher_topk(
    model: torch.nn.Module, samples: list[Sample], k: int, batch_size: int, pad_id: int, vocab: int
) -> TopK:
    """Run the teacher over ``samples`` (in order, ``batch_size`` at a time) and keep its top-k."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx, logp, counts = [], [], []
    for start in range(0, len(samples), batch_size):
        batch = {
            key: v.to(device) for key, v in pad_collate(samples[start : start + batch_size], pad_id).items()
        }
        top = torch.log_softmax(labelled_logits(model, batch, vocab).float(), -1).topk(min(k, vocab), dim=-1)
        idx.append(top.indices.to(torch.int32).cpu())
        logp.append(top.values.cpu())
        counts += loss_targets(batch)[0].sum(-1).tolist()
    model.train(was_training)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return TopK(torch.cat(idx), torch.cat(logp), offsets)


def cache_meta(teacher_path: str, k: int, samples: list[Sample]) -> dict:
    """What a cache must match: the teacher folder and its weight files' size / mtime, k, the samples."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.input_ids, s.labels]).encode())
    weights = sorted(Path(teacher_path).glob("*.safetensors")) + sorted(Path(teacher_path).glob("*.bin"))
    stats = [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
    return {"teacher": str(Path(teacher_path).resolve()), "weights": stats, "k": k, "samples": h.hexdigest()}


def save_topk(topk: TopK, folder: str | Path, meta: dict) -> Path:
    """Write the cache atomically (temp files then os.replace; meta last, so a torn write is ignored)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    tmp = folder / f".topk.safetensors.tmp-{os.getpid()}"
    save_file({"indices": topk.indices, "logprobs": topk.logprobs, "offsets": topk.offsets}, str(tmp))
    os.replace(tmp, folder / "topk.safetensors")
    tmp_meta = folder / f".meta.json.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, folder / "meta.json")
    return folder / "topk.safetensors"


def load_topk(folder: str | Path, meta: dict) -> TopK | None:
    """The cached top-k when ``folder`` holds one whose meta equals ``meta``, else None."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / "meta.json"
    if not meta_file.is_file() or json.loads(meta_file.read_text()) != meta:
        return None
    t = load_file(str(folder / "topk.safetensors"))
    return TopK(t["indices"], t["logprobs"], t["offsets"])
