"""`posttrain filter`: rejection sampling -- generate k, score, keep the good ones as SFT data.

For each prompt of a generations file (`posttrain.synth.generate`; generated here first when
no ``input`` is given):

1. every completion is scored by the recipe's reward terms (`posttrain.train.rl_data.RewardSet`:
   each record's ``metadata.scorer`` -- task verifiers, math-verify, code sandbox -- or a
   registered reward such as ``rm`` / ``judge`` with a model folder), the weighted sum being its
   reward r;
2. a completion *passes* when r >= ``threshold``; pass rate and pass@k count passes;
3. it is *eligible* when it passes, its text is not blank and (with ``drop_truncated``) it
   stopped on its own rather than at max_new_tokens;
4. ``keep: best`` keeps the eligible completion with the highest r (ties: the lower sample
   index); ``keep: all`` keeps every eligible one. With ``dedup``, a completion is dropped
   first when its text equals an earlier one of the same prompt -- or one already kept for an
   identical prompt -- after `posttrain.data.quality` normalisation (NFKC, casefold,
   whitespace folded: the exact-dedup key of ``posttrain data clean``); with
   ``near_dup_threshold`` also when data clean's MinHash estimate of their word-3-gram
   Jaccard similarity is at or above it.

Output: ``sft.jsonl`` of chat records ``{"messages": prompt + [assistant completion],
"metadata": {..., "reward", "sample_index", "generation_index"}}`` that `load_records` and
``posttrain sft`` (``data.train: .../sft.jsonl``) read, and ``filter_report.json``: per prompt
and overall the pass rate, the kept fraction and the unbiased pass@k (`pass_at_k`). Nothing
passing is a `DataError` after the report is written, never an empty file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from posttrain.config import to_dict
from posttrain.data.loaders import write_jsonl
from posttrain.data.quality.dedup import DedupConfig, NearDedupIndex, similarity
from posttrain.data.quality.items import normalize_text
from posttrain.errors import ConfigError, DataError
from posttrain.monitor.logger import console
from posttrain.synth.generate import GenerateRecipe, model_fingerprint, read_generations, run_generate
from posttrain.train.rl_data import RewardTermConfig

SFT_FILE = "sft.jsonl"
REPORT_FILE = "filter_report.json"
META_FILE = "filter_meta.json"


@dataclass
class FilterRecipe:
    """`posttrain filter RECIPE.yaml`: every key of a rejection-sampling run."""

    input: str = ""
    """A generations.jsonl written by `posttrain generate`; empty = generate here with `generate`."""
    generate: GenerateRecipe = field(default_factory=lambda: GenerateRecipe(output_dir=""))
    """The generation run used when input is empty (its output_dir "" = OUTPUT_DIR/generate)."""
    rewards: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig()])
    """Weighted reward terms (as in `posttrain rl`); `scorer` = each prompt's metadata.scorer."""
    keep: Literal["best", "all"] = "best"
    """best: one completion per prompt, the highest reward; all: every eligible completion."""
    threshold: float = 1.0
    """A completion passes when its reward >= threshold (1.0 = verified by a 0/1 verifier;
    -.inf keeps the best of every prompt, e.g. with a reward model)."""
    drop_truncated: bool = True
    """Never keep a completion cut by max_new_tokens (it would teach the model not to stop)."""
    dedup: bool = True
    """Drop duplicate responses per prompt (data clean's exact-dedup normalisation: NFKC, case, whitespace)."""
    near_dup_threshold: float | None = None
    """With dedup: also drop responses whose MinHash Jaccard similarity to an earlier one of the
    same prompt is >= this (data clean's near dedup, e.g. 0.8); null: exact duplicates only."""
    pass_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """k values of the reported pass@k (those larger than a prompt's n are skipped)."""
    output_dir: str = "runs/filter"
    """Run folder: sft.jsonl, filter_report.json, filter_meta.json (and generate/ without input)."""

    def validate(self) -> None:
        from posttrain.train.rl_data import check_reward_terms

        check_reward_terms(self.rewards)
        for i, t in enumerate(self.rewards):
            if t.placement == "steps":
                raise ConfigError(
                    "rejection sampling scores whole completions", where=f"rewards[{i}].placement",
                    fix="use placement: outcome",
                )  # fmt: skip
        if any(k < 1 for k in self.pass_k):
            raise ConfigError("pass_k values must be >= 1", where="pass_k")
        if math.isnan(self.threshold):
            raise ConfigError("threshold is NaN", where="threshold", fix="set a number, or -.inf")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            raise ConfigError(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}",
                              where="near_dup_threshold", fix="e.g. 0.8, or null for exact duplicates only")  # fmt: skip


# ---------------------------------------------------------------- pure parts


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of n samples with c correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i); 1 when n - c < k."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def choose(
    scores: list[float], eligible: list[bool], texts: list[str], keep: str, threshold: float,
    seen: set[str] | None = None, near: NearDedupIndex | None = None,
) -> tuple[list[int], int]:  # fmt: skip
    """The kept completions of one prompt and the number of duplicates dropped.

    Candidates: eligible with score >= threshold, ordered best-first (score desc, index asc)
    for ``keep="best"``, by index for ``"all"``. A candidate whose `normalize_text` equals an
    earlier candidate's, or one in ``seen`` (texts kept for an identical prompt; pass None to
    disable de-duplication), is a duplicate; with ``near`` (the near-dedup index of the texts
    kept for this prompt) so is one whose MinHash similarity to such a text, or to an earlier
    candidate's, reaches the index's threshold. ``seen`` and ``near`` gain the kept texts.
    """
    cands = [i for i, (s, e) in enumerate(zip(scores, eligible, strict=True)) if e and s >= threshold]
    if keep == "best":
        cands.sort(key=lambda i: (-scores[i], i))
    if seen is None:
        return (cands[:1] if keep == "best" else cands), 0
    local, unique, dups, sigs = set(seen), [], 0, {}
    for i in cands:
        key = normalize_text(texts[i])
        if key in local:
            dups += 1
            continue
        if near is not None:
            sig = near.signature(key)
            earlier = (similarity(sig.hashvalues, s.hashvalues) for s in sigs.values())
            if near.match(sig) is not None or max(earlier, default=0.0) >= near.cfg.threshold:
                dups += 1
                continue
            sigs[i] = sig
        local.add(key)
        unique.append(i)
    kept = unique[:1] if keep == "best" else unique
    seen.update(normalize_text(texts[i]) for i in kept)
    for i in kept if near is not None else ():
        near.add(sigs[i], f"sample {i}")
    return kept, dups


def prompt_stats(
    scores: list[float], threshold: float, kept: int, dups: int, ks: list[int]
) -> dict[str, float]:
    """One prompt's counts: n, passed, pass rate, kept, kept fraction, duplicates, pass@k."""
    n, c = len(scores), sum(s >= threshold for s in scores)
    out = {
        "n": n,
        "passed": c,
        "pass_rate": c / n,
        "kept": kept,
        "kept_fraction": kept / n,
        "duplicates": dups,
    }
    out.update({f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n})
    return out


def summarise(stats: list[dict]) -> dict[str, float]:
    """Totals over prompts: completions-weighted rates, prompt-mean pass@k (k <= every n)."""
    completions = sum(s["n"] for s in stats)
    out = {
        "prompts": len(stats),
        "completions": completions,
        "passed": sum(s["passed"] for s in stats),
        "kept": sum(s["kept"] for s in stats),
        "duplicates": sum(s["duplicates"] for s in stats),
        "prompts_solved": sum(s["passed"] > 0 for s in stats) / max(1, len(stats)),
        "prompts_kept": sum(s["kept"] > 0 for s in stats) / max(1, len(stats)),
    }
    out["pass_rate"] = out["passed"] / max(1, completions)
    out["kept_fraction"] = out["kept"] / max(1, completions)
    ks = sorted({k for s in stats for k in s if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    for k in ks:
        if all(k in s for s in stats):
            out[k] = sum(s[k] for s in stats) / len(stats)
    return out


def sft_record(row: dict, i: int, score: float) -> dict:
    """A chat record of completion ``i`` of generation record ``row``."""
    messages = [*row["prompt"], {"role": "assistant", "content": row["completions"][i]["text"]}]
    meta = {**row.get("metadata", {}), "reward": score, "sample_index": i}
    return {"messages": messages, "metadata": {**meta, "generation_index": row.get("index")}}


# ---------------------------------------------------------------- scoring and the run


def score_rows(rows: list[dict], terms: list[RewardTermConfig], chunk: int = 64) -> list[list[float]]:
    """The reward of every completion of every row (weighted sum of ``terms``)."""
    from posttrain.rollout.engine import Completion
    from posttrain.train.rl_data import RewardSet, check_scorers

    records = [{"prompt": r["prompt"], "metadata": r.get("metadata") or {}} for r in rows]
    check_scorers(records, terms)
    max_new = max(int(r.get("sampling", {}).get("max_new_tokens", 0)) for r in rows) or 1
    rewards = RewardSet(terms, tokenizer=None, max_new_tokens=max_new, overlong_buffer=None)
    out: list[list[float]] = []
    for start in range(0, len(rows), chunk):
        recs, comps = [], []
        for j, row in enumerate(rows[start : start + chunk]):
            for i, c in enumerate(row["completions"]):
                recs.append(records[start + j])
                comps.append(
                    Completion(
                        start + j, i, list(row.get("prompt_ids", [])), list(c.get("token_ids", [])),
                        c["text"], list(c.get("logprobs", [])), c.get("finish_reason", "length"),
                    )
                )  # fmt: skip
        outcome, _, _ = rewards.score(recs, comps)
        pos = 0
        for row in rows[start : start + chunk]:
            out.append(outcome[pos : pos + len(row["completions"])])
            pos += len(row["completions"])
    return out


def rejection_sample(rows: list[dict], scores: list[list[float]], recipe: FilterRecipe):
    """(SFT records, per-prompt stats) of scored generation rows (module docstring, steps 2-4)."""
    seen: dict[str, set[str]] = defaultdict(set)
    near: dict[str, NearDedupIndex] = {}
    kept_records, stats = [], []
    for row, sc in zip(rows, scores, strict=True):
        comps = row["completions"]
        eligible = [
            bool(c["text"].strip()) and not (recipe.drop_truncated and c.get("finish_reason") == "length")
            for c in comps
        ]
        prompt_key = json.dumps(row["prompt"], sort_keys=True)
        if recipe.dedup and recipe.near_dup_threshold is not None and prompt_key not in near:
            near[prompt_key] = NearDedupIndex(DedupConfig(threshold=recipe.near_dup_threshold))
        kept, dups = choose(
            sc, eligible, [c["text"] for c in comps], recipe.keep, recipe.threshold,
            seen[prompt_key] if recipe.dedup else None, near.get(prompt_key),
        )  # fmt: skip
        kept_records += [sft_record(row, i, sc[i]) for i in kept]
        s = prompt_stats(sc, recipe.threshold, len(kept), dups, recipe.pass_k)
        meta = row.get("metadata") or {}
        s.update(index=row.get("index"), task=meta.get("task"), level=meta.get("level"))
        s["ineligible"] = sum(not e for e in eligible)
        stats.append(s)
    return kept_records, stats


def build_report(stats: list[dict], source: Path, recipe: FilterRecipe) -> dict:
    """The JSON report: overall, per (task, level) group, per prompt."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in stats:
        groups[f"{s['task']}/L{s['level']}" if s.get("task") else "all"].append(s)
    return {
        "source": str(source),
        "keep": recipe.keep,
        "threshold": recipe.threshold,
        "overall": summarise(stats),
        "groups": {g: summarise(v) for g, v in sorted(groups.items())},
        "prompts": stats,
    }


def format_report(report: dict) -> str:
    """A plain-text table: one row per (task, level) group and the overall row."""
    ov = report["overall"]
    ks = [k for k in ov if k.startswith("pass@")]
    head = ["group", "prompts", "samples", "pass rate", *ks, "kept", "kept frac", "dups"]
    rows = [[g, *_cells(s, ks)] for g, s in report["groups"].items()] + [["overall", *_cells(ov, ks)]]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([line(head), *(line(r) for r in rows)])


def _cells(s: dict, ks: list[str]) -> list[str]:
    pk = [f"{s[k]:.3f}" if k in s else "-" for k in ks]
    return [str(s["prompts"]), str(s["completions"]), f"{s['pass_rate']:.3f}", *pk,
            str(s["kept"]), f"{s['kept_fraction']:.3f}", str(s["duplicates"])]  # fmt: skip


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_filter(recipe: FilterRecipe) -> Path:
    """Rejection-sample into OUTPUT_DIR/sft.jsonl (module docstring); returns its path."""
    out_dir = Path(recipe.output_dir)
    if recipe.input:
        source = Path(recipe.input)
    else:
        gen = recipe.generate
        gen_dir = gen.output_dir or str(out_dir / "generate")
        source = run_generate(dataclasses.replace(gen, output_dir=gen_dir))
    rows = read_generations(source)
    if not rows:
        raise DataError("the generations file holds no prompts", where=str(source))
    cfg = {k: v for k, v in to_dict(recipe).items() if k not in ("output_dir", "generate", "input")}
    models = [model_fingerprint(t.model) for t in recipe.rewards if t.model]  # a retrained RM rescores
    key = hashlib.sha256(json.dumps([cfg, _file_sha(source), models], sort_keys=True).encode()).hexdigest()
    out, report_path, meta_path = out_dir / SFT_FILE, out_dir / REPORT_FILE, out_dir / META_FILE
    if out.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        console.print(f"filter: {out} is complete for this input and recipe; skipped")
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    records, stats = rejection_sample(rows, score_rows(rows, recipe.rewards), recipe)
    report = build_report(stats, source, recipe)
    tmp = report_path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, report_path)
    console.print(format_report(report), markup=False, highlight=False, soft_wrap=True)
    if not records:
        ov = report["overall"]
        raise DataError(
            f"rejection sampling kept nothing: {ov['passed']} of {ov['completions']} completions of "
            f"{ov['prompts']} prompts reached the threshold {recipe.threshold:g}"
            + (", and none of those was eligible (blank or truncated)" if ov["passed"] else ""),
            where=f"threshold={recipe.threshold:g} (report: {report_path})",
            fix="sample more (generate.sampling.n), lower threshold, raise max_new_tokens, "
            "or start from a stronger model; no sft.jsonl was written",
        )
    write_jsonl(out, records)
    meta_path.write_text(json.dumps({"key": key, "source": str(source), "records": len(records)}))
    console.print(f"filter: kept {len(records)} records -> {out} (report: {report_path})")
    return out


def filter_main(recipe_path: str | None, overrides: list[str]) -> Path:
    from posttrain.config import load_recipe

    return run_filter(load_recipe(FilterRecipe, recipe_path, overrides))
