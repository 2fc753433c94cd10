"""Distillation vs plain SFT (issue 12): the diagnosis and the validation set that settings are chosen on.

The comparison itself is a pipeline (`posttrain run recipes/distill_compare.yaml`, graded on the
test split). This script holds the two measurements made before it, never on the test split:

- ``val MODEL...``: greedy accuracy on a validation set of arith_mag *train-split* questions that the
  distillation demonstrations (train split, seed 0, ``--demos`` per level of levels 1-2) do not contain:
  every unseen level-1 question there is (the level has ~1,300 train questions and the demos hold all
  but ~36), ``--n`` unseen level-2 ones, and ``--n`` level-3 and level-4 ones (no demo has those levels).
- ``diagnose MODEL...``: per-token statistics of each model on gold solutions with teacher forcing
  (the demonstrations, and the validation questions' reference solutions): entropy of the next-token
  distribution at T=1 and T=2, how often its argmax is the gold token, the mean probability of the gold
  token, split into *result digits* (the digits after `=` and `Answer:`, which carry the arithmetic)
  and every other trained token (copies of operands, format).

    python bench/distill_compare.py val runs/h2/e_sft700/final runs/h2/e_logit/final --out runs/h2/val.json
    python bench/distill_compare.py diagnose TEACHER STUDENT --out runs/h2/diag.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK, DEMO_LEVELS, VAL_SEED = "arith_mag", (1, 2), 7


def demo_questions(n_demos: int) -> set[str]:
    """The questions of the distillation demonstrations (task suite train split, seed 0)."""
    from posttrain.data.tasks import task_problems

    return {p.question for p in task_problems([TASK], "train", n_demos, 0, list(DEMO_LEVELS))}


def validation_problems(n: int, n_demos: int = 5000) -> list:
    """Train-split problems whose question no demonstration holds, unique, up to ``n`` per level."""
    from posttrain.data.tasks.split import make_split

    seen, out = demo_questions(n_demos), []
    for level in (1, 2, 3, 4):
        kept: dict[str, object] = {}
        draws = 30000 if level in DEMO_LEVELS else 4 * n
        for p in make_split(TASK, "train", draws, seed=VAL_SEED, levels=[level]):
            if p.question not in seen and p.question not in kept:
                kept[p.question] = p
            if len(kept) == n:
                break
        out += list(kept.values())
    return out


def result_digit_mask(pieces: list[str]) -> list[bool]:
    """Per token text: True for digits written after `=` or `:` (a step's result, the answer)."""
    out, in_result = [], False
    for s in pieces:
        t = s.strip()
        if t.endswith("=") or t.endswith(":"):
            in_result = True
            out.append(False)
        elif t.isdigit() and in_result:
            out.append(True)
        elif t == "":
            out.append(False)
        else:
            in_result = False
            out.append(False)
    return out


def token_stats(model, tok, samples, batch_size: int = 32) -> dict[str, float]:
    """Teacher-forced statistics of ``model`` on ``samples`` (module docstring), per token class."""
    import torch

    from posttrain.data.collate import pad_collate
    from posttrain.train.distill.teacher import labelled_logits
    from posttrain.train.lm_loss import loss_targets

    acc: dict[str, list[float]] = {}
    for start in range(0, len(samples), batch_size):
        part = samples[start : start + batch_size]
        batch = pad_collate(part, tok.pad_token_id)
        with torch.no_grad():
            logits = labelled_logits(model, batch, len(tok)).float()
        targets = loss_targets(batch)[1]
        digits = [
            m for s in part for m in result_digit_mask([tok.decode([t]) for t in s.labels if t != -100])
        ]
        cls = torch.tensor(digits)
        for name, temp in (("", 1.0), ("_t2", 2.0)):
            logp = torch.log_softmax(logits / temp, -1)
            ent = -(logp.exp() * logp).sum(-1)
            _add(acc, "entropy" + name, ent, cls)
        logp = torch.log_softmax(logits, -1)
        _add(acc, "argmax_is_gold", (logits.argmax(-1) == targets).float(), cls)
        _add(acc, "p_gold", logp.gather(-1, targets[:, None])[:, 0].exp(), cls)
    return {k: sum(v) / max(len(v), 1) for k, v in acc.items()}


def _add(acc: dict, key: str, values, cls) -> None:
    acc.setdefault(f"{key}/result_digits", []).extend(values[cls].tolist())
    acc.setdefault(f"{key}/other", []).extend(values[~cls].tolist())


def _samples(tok, problems) -> list:
    from posttrain.data.render import render_chat
    from posttrain.data.sft_data import resolve_step_sep

    sep = resolve_step_sep(tok, "auto")
    return [render_chat(tok, p.messages(step_sep=sep))[0] for p in problems]


def diagnose(models: list[str], n: int, n_demos: int) -> dict:
    from posttrain.data.tasks import task_problems
    from posttrain.models.load import load_model, load_tokenizer

    tok = load_tokenizer(models[0])
    demos = task_problems([TASK], "train", n_demos, 0, list(DEMO_LEVELS))
    sets = {"demos": demos[:n] + demos[n_demos : n_demos + n], "val_gold": validation_problems(n, n_demos)}
    out = {}
    for path in models:
        model = load_model(path, tokenizer=tok).eval()
        out[path] = {name: token_stats(model, tok, _samples(tok, probs)) for name, probs in sets.items()}
        print(path, json.dumps(out[path], indent=1), flush=True)
    return out


def val_accuracy(models: list[str], n: int, n_demos: int) -> dict:
    from posttrain.eval.accuracy import task_accuracy
    from posttrain.models.load import load_model, load_tokenizer

    problems, out = validation_problems(n, n_demos), {}
    for path in models:
        tok = load_tokenizer(path)
        report, _ = task_accuracy(load_model(path, tokenizer=tok).eval(), tok, problems, 64)
        cells = {f"L{lv}": 100.0 * c / report.total[(t, lv)] for (t, lv), c in sorted(report.correct.items())}
        cells["n"] = {f"L{lv}": report.total[(t, lv)] for (t, lv) in sorted(report.total)}
        cells["all"] = 100.0 * sum(report.correct.values()) / sum(report.total.values())
        out[path] = cells
        print(f"{path}: " + " ".join(f"{k} {v:.1f}" for k, v in cells.items() if k != "n"), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["val", "diagnose"])
    p.add_argument("models", nargs="+", help="model folders (final/)")
    p.add_argument(
        "--n", type=int, default=300, help="problems per level (val), samples per level (diagnose)"
    )
    p.add_argument("--demos", type=int, default=5000, help="demonstrations per level the arms trained on")
    p.add_argument("--out", default=None, help="merge the results into this JSON file")
    args = p.parse_args()
    fn = val_accuracy if args.what == "val" else diagnose
    res = fn(args.models, args.n, args.demos)
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**old, **res}, indent=1))


if __name__ == "__main__":
    main()
