"""Learned scorers in search on arith_mag levels 2-3 (issue 14's targets), learned scorers only.

Policy: an SFT model (default runs/quickstart/sft/final). Every scorer is trained here from the
policy's backbone, on the train split; every figure is measured on the test split.

1. Step labels: MC rollouts of the policy's chains on training questions (Math-Shepherd hard
   labels by default: a step is right iff any of k rollouts from it verifies; `--label soft`
   for the share, `posttrain.search.prm_label`). Three scorers, each `posttrain prm` for --steps
   steps: ``prm_mc`` (MC labels), ``prm_synth`` (the task suite's synthetic corrupted chains) and
   ``orm`` (outcome supervision: every step of a chain labelled with its final correctness, read at
   the last step). Step AUC and first-error accuracy of each on held-out chains the policy writes
   for test questions, with true step labels (target: prm_mc step AUC >= 0.85).
2. Best-of-8 on the same 8 samples: PRM-ranked (min over steps) vs majority vote vs ORM-ranked
   (target: PRM beats both); also PRM- and ORM-weighted majority (Math-Shepherd: answers
   weighted by the chain's score), PRM-ranked by its last step, and the policy's own likelihood
   (exp mean token log-prob, no scorer); the true verifier (oracle) as the upper bound.
   ``--pair-weight`` trains prm_mc with the within-question pairwise loss beside the step BCE.
   Label and scorer folders already under --out are reused (copy them from an earlier run).
3. PRM-guided beam and MCTS vs ORM best-of-N at equal generated tokens: ORM best-of-N is run at
   N = 1, 2, 4, 8, 16 and its accuracy interpolated (linearly in tokens) at each search's tokens.
4. Compute-optimal (PRM-scored probe, agreement bins) vs PRM best-of-N: the tokens PRM
   best-of-N needs for compute-optimal's accuracy (interpolated on its curve) over
   compute-optimal's tokens (target: >= 2, i.e. <= 50% of the tokens).

Scorer settings (measured on the quickstart SFT policy, arith_mag levels 2-3, held-out step AUC):
too few labelled chains over-fit (480 chains: train AUC 0.98 -> held-out 0.70 at 300 steps), so
the default labels 400 questions per level x 4 chains (~3,200 chains); hard labels generalise
better than soft ones (0.835 vs 0.763 at 300 steps; the soft target of a right step is the
policy's success rate from it, ~0.5 here); lr 1e-3 (3e-4: 0.61, 1e-4: 0.59 at 150 steps).
Every scorer's eval.json also reports its train_step_auc (over- vs under-fitting).

5. The confidence PRM (``conf``, `posttrain prm-conf`): the frozen policy's step mean / min token
   log-prob through a head trained on the same MC labels (BCE) plus a within-question chain pair
   loss; ``conf_all`` also reads the step entropies (reported for its step AUC only). Its
   best-of-N curve, weighted majority, beam, MCTS and compute-optimal rows use ``conf:min:PATH``.
   Its "before" is the raw step mean log-prob (no head). Summarise seeds with
   ``python bench/search_summary.py OUT_s0 OUT_s1 OUT_s2``.

results.json and a markdown table go to --out. The last line names the machine, its load, and
the ratios. ``--seed`` changes the MC sampling, the scorers' init/data order and the search's
sampling (labels and training use train-split questions only; every figure is on the test split).

    python bench/search_learned.py [--policy runs/quickstart/sft/final] [--n-train 400] [--n-test 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

STEP = {"max_step_tokens": 24, "max_new_tokens": 96, "max_depth": 8, "step_sep": "<step>"}
LEVELS = [2, 3]


def label(policy: str, out: Path, split: str, n: int, k: int, chains: int, search: str, how: str = "hard",
          seed: int = 0) -> Path:  # fmt: skip
    """MC-labelled chains of the policy (prm.jsonl, oracle.jsonl) for ``n`` questions per level."""
    from posttrain.search.compare import SearchModelConfig, TaskSetConfig
    from posttrain.search.mc_labels import MCLabelConfig
    from posttrain.search.prm_label import PRMLabelRecipe, run_prm_label

    recipe = PRMLabelRecipe(
        model=SearchModelConfig(path=policy),
        problems=TaskSetConfig(tasks=["arith_mag"], levels=LEVELS, n_per_level=n, split=split),
        mc=MCLabelConfig(n_chains=chains, k=k, search=search, label=how, max_new_tokens=96, seed=seed),  # type: ignore[arg-type]
        output_dir=str(out),
    )
    done, want = out / "stats.json", json.loads(json.dumps(asdict(recipe)))
    if (out / "prm.jsonl").exists() and done.exists():  # labels copied from another --out: reuse them
        had = json.loads(done.read_text()).get("recipe", {})
        same = {"output_dir": "", "force": False}  # where it was written and a rerun switch: not the labels
        if {**had, **same} == {**want, **same}:
            return out
    return Path(run_prm_label(recipe)).parent


def outcome_records(prm_file: Path, out: Path) -> Path:
    """The MC chains with every step labelled by the chain's own outcome (ORM supervision)."""
    rows = [json.loads(x) for x in prm_file.read_text().splitlines() if x.strip()]
    for r in rows:
        r["labels"] = [float(r["metadata"]["correct"])] * len(r["labels"])
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def train_scorer(
    policy: str, train: str, held_out: Path, out: Path, steps: int, extra: list[str], seed: int = 0
) -> dict:
    from posttrain.config import load_recipe
    from posttrain.train.prm import PRMRecipe, run_prm

    if (out / "final").is_dir() and (out / "eval.json").exists():  # trained already: delete to retrain
        report = json.loads((out / "eval.json").read_text())
        return {
            "path": str(out / "final"),
            "before": report.get("before", {}),
            "after": report.get("after", {}),
        }
    keys = [f"model.path={policy}", f"data.train={train}", f"data.eval={held_out}", f"output_dir={out}",
            f"train.max_steps={steps}", "train.batch_size=16", "train.save_every=0", "optim.lr=1e-3",
            "optim.warmup_steps=10", "train.tensorboard=false", f"seed={seed}",
            "anomaly.on_anomaly=warn", *extra]  # fmt: skip  # a measurement: warn, never pause
    final = run_prm(load_recipe(PRMRecipe, None, keys))
    report = json.loads((out / "eval.json").read_text())
    return {"path": str(final), "before": report.get("before", {}), "after": report.get("after", {})}


def train_conf(policy: str, train: Path, held_out: Path, out: Path, features: list[str]) -> dict:
    """A confidence PRM (`posttrain prm-conf`: frozen policy log-prob features, step BCE + pair
    loss); held-out step AUC / pair_acc from its eval.json ("before": raw step mean log-prob)."""
    from posttrain.train.prm_conf import PRMConfRecipe, run_prm_conf

    recipe = PRMConfRecipe(policy=policy, train=str(train), eval=str(held_out), features=features,
                           output_dir=str(out))  # fmt: skip
    final = run_prm_conf(recipe)
    report = json.loads((out / "eval.json").read_text())
    after = report["after"]
    return {"path": str(final), "before": report["before"], "after": after, "pair_acc": after["pair_acc"],
            "pairs": after["pairs"]}  # fmt: skip


def pair_accuracy(scorer: str, held_out: Path, agg: str) -> tuple[float | None, int]:
    """Selection, not pooled AUC: over pairs of held-out chains of the same question, one right
    and one wrong, the share the scorer ranks right first (ties half), and the pair count. A
    scorer can reach a high pooled step AUC by learning which questions the policy fails."""
    from posttrain.models.heads import prm_response
    from posttrain.rewards.models import ModelScorer

    rows = [json.loads(x) for x in held_out.read_text().splitlines() if x.strip()]
    texts = [prm_response(r["completions"], "<step>", "</think>", r["final"]) for r in rows]
    scores = ModelScorer(scorer, agg=agg, device="cpu")([r["prompt"] for r in rows], texts)
    return same_question_pairs(rows, [sc.score for sc in scores])


def same_question_pairs(rows: list[dict], scores: list[float]) -> tuple[float | None, int]:
    """Over pairs of chains of one question, one right and one wrong: the share where the right
    one scores higher (ties half), and the pair count."""
    from collections import defaultdict

    by: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for r, sc in zip(rows, scores, strict=True):
        by[json.dumps(r["prompt"])].append((sc, bool(r["metadata"]["correct"])))
    pairs = [(a > b) + 0.5 * (a == b) for v in by.values() for a, ca in v for b, cb in v if ca and not cb]
    return (sum(pairs) / len(pairs) if pairs else None), len(pairs)


def likelihood_pair_accuracy(policy: str, held_out: Path) -> tuple[float | None, int]:
    """The control for `pair_accuracy`: the policy's own mean token log-prob of each chain."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.render import render_prompt_completion
    from posttrain.models.heads import prm_response

    rows = [json.loads(x) for x in held_out.read_text().splitlines() if x.strip()]
    tok, model = AutoTokenizer.from_pretrained(policy), AutoModelForCausalLM.from_pretrained(policy).eval()
    scores = []
    with torch.no_grad():
        for r in rows:
            text = prm_response(r["completions"], "<step>", "</think>", r["final"])
            sample = render_prompt_completion(tok, r["prompt"], text, "held-out")
            ids, labels = torch.tensor([sample.input_ids]), torch.tensor(sample.labels[1:])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            token = logp.gather(-1, ids[0, 1:, None])[:, 0]
            scores.append(float(token[labels != -100].mean()))
    return same_question_pairs(rows, scores)


def specs(prm: str, orm: str, conf: str | None = None) -> list[dict]:
    """The strategies: every learned row, then the oracle upper bound; with ``conf`` (a
    confidence-PRM folder) also its best-of-N curve, weighted majority, beam, MCTS, compute-optimal."""
    p, o = f"prm:min:{prm}", f"prm:last:{orm}"
    bon = {"select": "prm_last", "step": STEP}
    rows = [{"name": "greedy", "config": {"step": STEP}},
            {"name": "best_of_n", "label": "majority@8", "config": {"n": 8, "select": "majority", "step": STEP},
             "series": "majority"}]  # fmt: skip
    for n in (1, 2, 4, 8, 16):
        rows.append({"name": "best_of_n", "label": f"prm_bon@{n}", "config": {"n": n, **bon}, "scorer": p,
                     "series": "prm_best_of_n"})  # fmt: skip
        rows.append({"name": "best_of_n", "label": f"orm_bon@{n}", "config": {"n": n, **bon}, "scorer": o,
                     "series": "orm_best_of_n"})  # fmt: skip
    rows += [{"name": "best_of_n", "label": "prm_wmaj@8", "config": {"n": 8, "select": "weighted_majority",
              "step": STEP}, "scorer": p},
             {"name": "best_of_n", "label": "orm_wmaj@8", "config": {"n": 8, "select": "weighted_majority",
              "step": STEP}, "scorer": o},
             {"name": "best_of_n", "label": "prm_last_bon@8", "config": {"n": 8, **bon}, "scorer": f"prm:last:{prm}"},
             {"name": "best_of_n", "label": "likelihood@8", "config": {"n": 8, "select": "likelihood", "step": STEP}}]  # fmt: skip
    co = {"probe_n": 4, "difficulty": "agreement", "edges": [0.25, 0.6], "probe_select": "majority",
          "bins": [{"strategy": "probe"}, {"strategy": "best_of_n", "config": {"n": 4, **bon}},
                   {"strategy": "best_of_n", "config": {"n": 12, **bon}}], "step": STEP}  # fmt: skip
    rows += [{"name": "beam", "label": "prm_beam", "config": {"beam_width": 2, "expand_k": 4, "step": STEP},
              "scorer": p},
             {"name": "mcts", "label": "prm_mcts", "config": {"n_simulations": 8, "expand_k": 3, "step": STEP},
              "scorer": p},
             {"name": "compute_optimal", "label": "prm_compute_optimal", "config": co, "scorer": p}]  # fmt: skip
    if conf:
        rows += conf_specs(f"conf:min:{conf}", co)
    rows.append({"name": "best_of_n", "label": "verifier_bon@8", "config": {"n": 8, "select": "verifier",
                 "step": STEP}, "scorer": "verifier"})  # fmt: skip
    return rows


def conf_specs(c: str, co: dict) -> list[dict]:
    """The confidence PRM's rows (scorer ``c``): best-of-N at 1-16, weighted majority, beam, MCTS and
    compute-optimal (the same settings as the PRM's)."""
    bon = {"select": "prm_last", "step": STEP}
    rows = [{"name": "best_of_n", "label": f"conf_bon@{n}", "config": {"n": n, **bon}, "scorer": c,
             "series": "conf_best_of_n"} for n in (1, 2, 4, 8, 16)]  # fmt: skip
    return rows + [
        {"name": "best_of_n", "label": "conf_wmaj@8", "scorer": c,
         "config": {"n": 8, "select": "weighted_majority", "step": STEP}},
        {"name": "beam", "label": "conf_beam", "config": {"beam_width": 2, "expand_k": 4, "step": STEP}, "scorer": c},
        {"name": "mcts", "label": "conf_mcts", "config": {"n_simulations": 8, "expand_k": 3, "step": STEP},
         "scorer": c},
        {"name": "compute_optimal", "label": "conf_compute_optimal", "config": co, "scorer": c},
    ]  # fmt: skip


def accuracy_at(curve: list[tuple[float, float]], tokens: float) -> float | None:
    """A (tokens, accuracy) curve's accuracy at ``tokens``, linear between measured points."""
    pts = sorted(curve)
    for (t0, a0), (t1, a1) in zip(pts, pts[1:], strict=False):
        if t0 <= tokens <= t1:
            return a0 + (a1 - a0) * (tokens - t0) / (t1 - t0) if t1 > t0 else a1
    return None


def compare_rows(rows) -> dict:
    from posttrain.search.report import tokens_at_accuracy

    by = {r.label: r for r in rows}
    curve = {s: [(r.tokens_per_problem, r.accuracy) for r in rows if r.series == s]
             for s in ("prm_best_of_n", "orm_best_of_n", "conf_best_of_n")}  # fmt: skip
    keys = (
        "prm_bon@8",
        "majority@8",
        "orm_bon@8",
        "prm_wmaj@8",
        "orm_wmaj@8",
        "prm_last_bon@8",
        "likelihood@8",
        "verifier_bon@8",
    )
    keys += tuple(k for k in ("conf_bon@8", "conf_wmaj@8") if k in by)
    out: dict = {"bo8": {k: by[k].accuracy for k in keys}}
    for name in ("prm_beam", "prm_mcts", "conf_beam", "conf_mcts"):
        if name not in by:
            continue
        r = by[name]
        orm_acc = accuracy_at(curve["orm_best_of_n"], r.tokens_per_problem)
        out[name] = {
            "accuracy": r.accuracy,
            "tokens": r.tokens_per_problem,
            "orm_bon_at_equal_tokens": orm_acc,
        }
    for name, series in (("prm", "prm_best_of_n"), ("conf", "conf_best_of_n")):
        if f"{name}_compute_optimal" not in by:
            continue
        co = by[f"{name}_compute_optimal"]
        need = tokens_at_accuracy(curve[series], co.accuracy)
        key = "compute_optimal" if name == "prm" else "conf_compute_optimal"
        out[key] = {"accuracy": co.accuracy, "tokens": co.tokens_per_problem, "bon_tokens": need,
                    "ratio": need / co.tokens_per_problem if need and co.tokens_per_problem else None}  # fmt: skip
    return out


def fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="runs/quickstart/sft/final")
    ap.add_argument("--out", default="runs/bench_search_learned")
    ap.add_argument("--n-train", type=int, default=400, help="training questions per level (MC labels)")
    ap.add_argument("--k", type=int, default=4, help="rollouts per step prefix")
    ap.add_argument("--n-test", type=int, default=50, help="test questions per level")
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps of each scorer")
    ap.add_argument("--label", choices=["hard", "soft"], default="hard", help="MC label of prm_mc")
    ap.add_argument(
        "--pair-weight", type=float, default=0.0, help="prm_mc's within-question pairwise loss (0 = BCE only)"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="MC sampling, scorer init/data order, search sampling"
    )
    args = ap.parse_args()
    out, t0 = Path(args.out), time.time()
    from posttrain.search.compare import strategy_table
    from posttrain.search.report import format_markdown

    s = args.seed
    train = label(args.policy, out / "mc_train", "train", args.n_train, args.k, 4, "full", args.label, s)
    test = label(
        args.policy, out / "mc_test", "test", args.n_test, 1, 4, "binary", "hard", s
    )  # true labels only
    held = test / "oracle.jsonl"
    orm_file = outcome_records(train / "prm.jsonl", out / "orm_train.jsonl")
    synth = ["data.tasks=[arith_mag]", "data.levels=[2,3]", "data.n_per_level=200"]
    steps = args.steps
    pw = [f"pair_weight={args.pair_weight}"]
    scorers = {"prm_mc": train_scorer(args.policy, str(train / "prm.jsonl"), held, out / "prm_mc", steps, pw, s),
               "prm_synth": train_scorer(args.policy, "tasks", held, out / "prm_synth", steps, synth, s),
               "orm": train_scorer(args.policy, str(orm_file), held, out / "orm", steps, [], s)}  # fmt: skip
    for name, sc in scorers.items():
        sc["pair_acc"], sc["pairs"] = pair_accuracy(sc["path"], held, "last" if name == "orm" else "min")
    scorers["conf"] = train_conf(
        args.policy, train / "prm.jsonl", held, out / "conf", ["mean_logp", "min_logp"]
    )
    scorers["conf_all"] = train_conf(args.policy, train / "prm.jsonl", held, out / "conf_all",
                                     ["mean_logp", "min_logp", "mean_entropy", "max_entropy"])  # fmt: skip
    likelihood_pairs = likelihood_pair_accuracy(args.policy, held)
    from posttrain.data.tasks import task_problems

    problems = task_problems(["arith_mag"], "test", args.n_test, 0, LEVELS)
    rows = strategy_table(
        args.policy,
        problems,
        specs(scorers["prm_mc"]["path"], scorers["orm"]["path"], scorers["conf"]["path"]),
        "none",
        seed=s,
    )
    figures = compare_rows(rows)
    table = format_markdown(rows)
    mc_stats = json.loads((train / "stats.json").read_text())
    result = {"scorers": scorers, "figures": figures, "likelihood_pair_acc": likelihood_pairs, "rows": [r.to_dict() for r in rows], "mc": mc_stats,
              "args": vars(args), "seconds": time.time() - t0, "loadavg": os.getloadavg()}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    for name, sc in scorers.items():
        print(f"{name}: step AUC {fmt(sc['before'].get('step_auc'))} -> {fmt(sc['after'].get('step_auc'))} "
              f"(train {fmt(sc['after'].get('train_step_auc'))}), "
              f"first-error acc {fmt(sc['after'].get('first_error_acc'))}, same-question right>wrong "
              f"{fmt(sc['pair_acc'])} over {sc['pairs']} pairs")  # fmt: skip
    print(f"policy likelihood (control, no scorer): same-question right>wrong {fmt(likelihood_pairs[0])} over "
          f"{likelihood_pairs[1]} pairs")  # fmt: skip
    f, co = figures, figures["compute_optimal"]
    print(f"best-of-8 on the same samples: prm {f['bo8']['prm_bon@8']:.3f}, majority {f['bo8']['majority@8']:.3f}, "
          f"orm {f['bo8']['orm_bon@8']:.3f}, verifier (oracle) {f['bo8']['verifier_bon@8']:.3f}; PRM-weighted "
          f"majority {f['bo8']['prm_wmaj@8']:.3f}, ORM-weighted {f['bo8']['orm_wmaj@8']:.3f}, prm:last "
          f"{f['bo8']['prm_last_bon@8']:.3f}, policy likelihood {f['bo8']['likelihood@8']:.3f}")  # fmt: skip
    print(f"confidence PRM (conf): best-of-8 {f['bo8']['conf_bon@8']:.3f}, weighted majority "
          f"{f['bo8']['conf_wmaj@8']:.3f}")  # fmt: skip
    for name in ("prm_beam", "prm_mcts", "conf_beam", "conf_mcts"):
        print(f"{name}: {f[name]['accuracy']:.3f} at {f[name]['tokens']:.0f} tokens/problem; ORM best-of-N at "
              f"equal tokens {fmt(f[name]['orm_bon_at_equal_tokens'])}")  # fmt: skip
    print(f"compute_optimal: {co['accuracy']:.3f} at {co['tokens']:.0f} tokens; PRM best-of-N needs "
          f"{fmt(co['bon_tokens'], '.0f')} -> ratio {fmt(co['ratio'], '.2f')}")  # fmt: skip
    cc = figures["conf_compute_optimal"]
    print(f"conf_compute_optimal: {cc['accuracy']:.3f} at {cc['tokens']:.0f} tokens; conf best-of-N needs "
          f"{fmt(cc['bon_tokens'], '.0f')} -> ratio {fmt(cc['ratio'], '.2f')}")  # fmt: skip
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, loadavg {load}, "
          f"{time.time() - t0:.0f} s | prm_mc step AUC {fmt(scorers['prm_mc']['after'].get('step_auc'))} | "
          f"bo8 prm/majority {f['bo8']['prm_bon@8']:.3f}/{f['bo8']['majority@8']:.3f} prm/orm "
          f"{f['bo8']['prm_bon@8']:.3f}/{f['bo8']['orm_bon@8']:.3f} | beam vs orm-bon@equal-tokens "
          f"{f['prm_beam']['accuracy']:.3f}/{fmt(f['prm_beam']['orm_bon_at_equal_tokens'])} | mcts "
          f"{f['prm_mcts']['accuracy']:.3f}/{fmt(f['prm_mcts']['orm_bon_at_equal_tokens'])} | "
          f"compute-optimal token ratio {fmt(co['ratio'], '.2f')}")  # fmt: skip


if __name__ == "__main__":
    main()
