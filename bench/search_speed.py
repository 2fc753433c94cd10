"""Tree search speed: beam search and MCTS vs flat best-of-N, generated tokens/s, with and without prompt KV reuse.

    python bench/search_speed.py [--model tiny|smollm2] [--problems 12] [--precision auto|fp32|bf16] [--repeat 2]

Same model, problems (arith levels 1-3 from the test split) and engine; best-of-N (n = 8,
verifier) decodes each prompt once, while beam search (width 4, 3 expansions) and MCTS (16
simulations) call the policy once per tree step with the path so far as the prompt. Without
prompt KV reuse every step re-encodes its whole path; with it (`model.prefix_cache_tokens`,
`posttrain.rollout.prefix_cache`) only the step's new tokens run. Tokens/s = generated tokens /
the strategy's wall time (scoring included: the oracle step checker, cheap). After one
warm-up run, runs alternate reuse off / on, `--repeat` times; figures are totals over the repeats.

The last line: `tree/flat tokens/s: beam X.XX, mcts Y.YY (reuse on; off: ...)` and the machine;
the target (issue 17) is >= 0.80.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import machine, machine_line, model_path

STRATEGIES = [
    {"name": "best_of_n", "label": "best_of_n", "config": {"n": 8, "select": "verifier"}},
    {"name": "beam", "label": "beam", "scorer": "oracle_prm", "config": {"beam_width": 4, "expand_k": 3}},
    {"name": "mcts", "label": "mcts", "scorer": "oracle_prm", "config": {"n_simulations": 16, "expand_k": 3}},
]


def run_once(model: Path, problems: int, precision: str, reuse: int, out: Path) -> dict[str, dict]:
    from posttrain.config import load_recipe
    from posttrain.search.compare import SearchRecipe, run_search_recipe

    overrides = [
        f"model.path={model}", f"model.precision={precision}", f"model.prefix_cache_tokens={reuse}",
        "tasks.tasks=[arith]", "tasks.levels=[1,2,3]", f"tasks.n_per_level={max(1, problems // 3)}",
        "scorer=verifier", f"strategies={json.dumps(STRATEGIES)}", f"output_dir={out}",
    ]  # fmt: skip
    out = run_search_recipe(load_recipe(SearchRecipe, None, overrides))
    return {r["label"]: r for r in json.loads((out / "results.json").read_text())["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--problems", type=int, default=12)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    mach = machine()
    print(f"machine: {machine_line(mach)}; load average {os.getloadavg()[0]:.2f}", flush=True)
    path = model_path(a.model)
    totals: dict[tuple[int, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        run_once(path, a.problems, a.precision, 0, Path(tmp) / "warm-up")  # loads, first-call costs
        for i in range(a.repeat):
            for reuse in (0, 8192) if i % 2 == 0 else (8192, 0):
                rows = run_once(path, a.problems, a.precision, reuse, Path(tmp) / f"r{i}-{reuse}")
                for label, r in rows.items():
                    t = totals.setdefault((reuse, label), [0.0, 0.0])
                    t[0] += r["generated_tokens"]
                    t[1] += r["seconds"]
    print(f"\n{a.model}: {path}; {a.problems} problems, precision {a.precision}, x{a.repeat}")
    print(f"{'strategy':<12}{'reuse':>6}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    tps = {}
    for (reuse, label), (tok, sec) in sorted(totals.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tps[reuse, label] = tok / max(sec, 1e-9)
        print(f"{label:<12}{'on' if reuse else 'off':>6}{tok:>8.0f}{sec:>9.2f}{tps[reuse, label]:>10.0f}")
    ratio = {r: {s: tps[r, s] / tps[r, "best_of_n"] for s in ("beam", "mcts")} for r in (0, 8192)}
    print(
        f"tree/flat tokens/s: beam {ratio[8192]['beam']:.2f}, mcts {ratio[8192]['mcts']:.2f} (reuse on; off: "
        f"beam {ratio[0]['beam']:.2f}, mcts {ratio[0]['mcts']:.2f}) on {machine_line(mach)}"
    )


if __name__ == "__main__":
    main()
