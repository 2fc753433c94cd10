"""Held-out task accuracy: greedy (or configured) decoding, graded by each task's verifier."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from posttrain.data.tasks import get_task
from posttrain.data.tasks.base import Problem


@dataclass
class AccuracyReport:
    """Per (task, level) correct/total counts, plus generation cost."""

    correct: dict[tuple[str, int], int] = field(default_factory=dict)
    total: dict[tuple[str, int], int] = field(default_factory=dict)
    generated_tokens: int = 0
    seconds: float = 0.0

    def acc(
        self, task: str | None = None, level: int | None = None, levels: Collection[int] | None = None
    ) -> float:
        """Accuracy over the (task, level) cells that match; NaN if none do."""
        keys = [
            k for k in self.total
            if (task is None or k[0] == task) and (level is None or k[1] == level) and (levels is None or k[1] in levels)
        ]  # fmt: skip
        n = sum(self.total[k] for k in keys)
        return sum(self.correct[k] for k in keys) / n if n else float("nan")

    def to_dict(self) -> dict:
        rows = {f"{t}/L{lv}": self.correct[(t, lv)] / self.total[(t, lv)] for t, lv in sorted(self.total)}
        return {
            "overall": self.acc(),
            **rows,
            "generated_tokens": self.generated_tokens,
            "seconds": self.seconds,
        }


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 64):
    """Greedy completions (text, new-token count) for chat prompts; left-padded batches, KV cache."""
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    outs: list[tuple[str, int]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            for row in new:
                n = int((row != tokenizer.pad_token_id).sum())
                outs.append((tokenizer.decode(row, skip_special_tokens=True), n))
    finally:
        tokenizer.padding_side = side
    return outs


def task_accuracy(
    model, tokenizer, problems: list[Problem], max_new_tokens: int = 96, batch_size: int = 64
) -> tuple[AccuracyReport, list[dict]]:
    """Grade greedy completions of `problems` with their task's verifier.

    Returns the report and one record per problem (question, completion, correct)."""
    t0 = time.perf_counter()
    outs = generate_batch(
        model, tokenizer, [p.prompt_record()["prompt"] for p in problems], max_new_tokens, batch_size
    )
    report = AccuracyReport()
    correct, total = defaultdict(int), defaultdict(int)
    records = []
    for p, (text, n) in zip(problems, outs, strict=True):
        ok = bool(get_task(p.task).verify(text, p.answer))
        correct[(p.task, p.level)] += ok
        total[(p.task, p.level)] += 1
        report.generated_tokens += n
        records.append(
            {"task": p.task, "level": p.level, "question": p.question, "completion": text, "correct": ok}
        )
    report.correct, report.total = dict(correct), dict(total)
    report.seconds = time.perf_counter() - t0
    return report, records


def format_table(reports: dict[str, AccuracyReport], markdown: bool = False) -> str:
    """Accuracy (%) per task and level, one column per named report."""
    names = list(reports)
    keys = sorted({k for r in reports.values() for k in r.total})
    header = ["task", "level", *names]
    rows = [[t, f"L{lv}", *[f"{100 * reports[n].acc(t, lv):.1f}" for n in names]] for t, lv in keys]
    for t in sorted({k[0] for k in keys}):
        rows.append([t, "all", *[f"{100 * reports[n].acc(t):.1f}" for n in names]])
    rows.append(["all", "all", *[f"{100 * reports[n].acc():.1f}" for n in names]])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])
