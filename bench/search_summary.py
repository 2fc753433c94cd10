"""Mean ± sd over seeds of bench/search_learned.py's figures (one results.json per seed).

    python bench/search_summary.py runs/h3_search_s0 runs/h3_search_s1 runs/h3_search_s2

Prints one markdown table: every scorer's held-out step AUC and same-question pair accuracy, every
row's accuracy and tokens per problem (oracle rows marked), and the issue's target comparisons
(beam / MCTS vs ORM best-of-N interpolated at equal tokens, compute-optimal token ratios).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def mean_sd(values: list) -> str:
    """``mean ± sd`` of the non-None values (sd over seeds, n-1), and how many were None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    missing = len(values) - len(xs)
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}" + (f" ({missing} n/a)" if missing else "")


def summary(results: list[dict]) -> list[str]:
    """The markdown lines of the summary table over ``results`` (one dict per seed)."""
    lines = [f"seeds: {[r['args']['seed'] for r in results]}", "", "| figure | mean ± sd |", "|---|---|"]
    for name in results[0]["scorers"]:
        auc = [r["scorers"][name].get("after", {}).get("step_auc") for r in results]
        lines.append(f"| {name} held-out step AUC | {mean_sd(auc)} |")
        lines.append(
            f"| {name} same-question pair acc | {mean_sd([r['scorers'][name].get('pair_acc') for r in results])} |"
        )
    lines.append(
        f"| policy likelihood pair acc (control) | {mean_sd([r['likelihood_pair_acc'][0] for r in results])} |"
    )
    for row in results[0]["rows"]:
        label = row["label"]
        got = [next((x for x in r["rows"] if x["label"] == label), None) for r in results]
        acc = mean_sd([g["accuracy"] if g else None for g in got])
        tok = mean_sd([g["tokens_per_problem"] if g else None for g in got])
        tag = " (oracle)" if row.get("oracle") else ""
        lines.append(f"| {label}{tag} accuracy / tokens per problem | {acc} / {tok} |")
    for name in ("prm_beam", "prm_mcts", "conf_beam", "conf_mcts"):
        if name in results[0]["figures"]:
            orm = mean_sd([r["figures"][name]["orm_bon_at_equal_tokens"] for r in results])
            lines.append(f"| {name} vs ORM best-of-N at equal tokens | {mean_sd([r['figures'][name]['accuracy'] for r in results])} vs {orm} |")  # fmt: skip
    for name in ("compute_optimal", "conf_compute_optimal"):
        if name in results[0]["figures"]:
            ratio = mean_sd([r["figures"][name]["ratio"] for r in results])
            lines.append(f"| {name} token ratio at equal accuracy | {ratio} |")
    return lines


def main() -> None:
    results = [json.loads((Path(d) / "results.json").read_text()) for d in sys.argv[1:]]
    print("\n".join(summary(results)))


if __name__ == "__main__":
    main()
