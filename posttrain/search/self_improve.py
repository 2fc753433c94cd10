"""The self-improvement loop (rStar-Math, ReST-MCTS*): `posttrain self-improve RECIPE.yaml`.

Search writes traces; verified traces train the policy; Monte-Carlo step values train the PRM
that guides the next round's search. Round r (1..``rounds``), in ``OUTPUT_DIR/round_<r>/``:

1. **search** -- ``search.strategy`` (best-of-N, beam, MCTS...) over a fresh draw of *training*
   prompts (train split, seed + r), guided by the current learned scorer: the PRM trained in
   round r-1 (round 1: ``prm`` if given, else ``first_scorer``, e.g. majority vote). Every
   finished path is verified against the training answer (its outcome). The replay buffer
   ``OUTPUT_DIR/replay.jsonl`` receives the traces (trace supervision), the verified paths
   (``sft``: outcome supervision), and the MC step labels and prefix values (``prm``,
   ``value``: process supervision).
2. **step values** -- up to ``mc.n_chains`` finished paths per prompt have each step prefix
   completed ``mc.k`` times by the same policy (Math-Shepherd soft labels, `mc_labels`).
3. **policy** -- SFT of the current policy on every verified trace in the buffer (with
   ``trace_filter: steps``, the default, only those whose every step passes the task's step
   checker: a right answer reached through a wrong step is not trained on).
4. **PRM** -- trained from the current policy's backbone on every MC record in the buffer; its
   step AUC is measured on chains the policy writes for *test* questions, with true step labels.
5. **eval** (test split only; no test question is ever trained on) -- greedy accuracy of the new
   policy, and the accuracy and tokens of each ``eval_strategies`` entry with the new PRM
   (scorer ``prm``), or any scorer name.

``round_0.json`` holds the starting policy's figures. A round with no verified trace is skipped
with its reason (policy and PRM carry over). A finished round (its ``round.json``) is skipped on
a rerun; SFT and PRM training resume from their checkpoints. A replay buffer written with
another tokenizer is an error. Returns ``OUTPUT_DIR/self_improve.json`` (every round's figures); ``self_improve.md`` holds
the per-round table (held-out greedy accuracy, best learned-scorer search accuracy, PRM step AUC).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, DataError
from posttrain.monitor.logger import console
from posttrain.search.compare import (
    SearchModelConfig,
    StrategySpec,
    TaskSetConfig,
    load_policy,
    task_problems,
)
from posttrain.search.mc_labels import MCLabelConfig

TRACE_FILTERS = ("outcome", "steps")
_STEP = {"max_step_tokens": 24, "max_new_tokens": 96, "max_depth": 8, "step_sep": "<step>"}


def _eval_strategies() -> list[StrategySpec]:
    return [StrategySpec("best_of_n", label="prm_best_of_n(n=4)", scorer="prm",
                         config={"n": 4, "select": "prm_last", "step": dict(_STEP)})]  # fmt: skip


@dataclass
class LoopSearchConfig:
    """The search that writes a round's traces."""

    strategy: str = "best_of_n"
    """A registered strategy (`posttrain.search.strategy_names()`)."""
    config: dict[str, Any] = field(
        default_factory=lambda: {"n": 4, "select": "prm_last", "temperature": 1.0, "step": dict(_STEP)}
    )
    """The strategy's config keys."""
    scorer: str = "prm"
    """``prm``: the loop's current PRM; else any scorer name (`posttrain.search.scorer_specs`)."""


@dataclass
class SelfImproveRecipe:
    """`posttrain self-improve RECIPE.yaml`: every key of the loop (module docstring)."""

    model: SearchModelConfig = field(
        default_factory=lambda: SearchModelConfig(path="runs/quickstart/sft/final")
    )
    """The starting policy."""
    prm: str | None = None
    """A starting PRM folder for round 1's search (None: round 1 uses ``first_scorer``)."""
    prm_agg: str = "min"
    """How the PRM's step probabilities combine along a path: min, last, mean or product."""
    first_scorer: str = "majority"
    """Round 1's scorer when no ``prm`` is given (a vote needs no model)."""
    rounds: int = 3
    """Rounds to run."""
    train_prompts: TaskSetConfig = field(
        default_factory=lambda: TaskSetConfig(
            tasks=["arith_mag"], levels=[2, 3], n_per_level=32, split="train"
        )
    )
    """Training prompts searched each round (a fresh draw per round: ``seed + round``)."""
    eval_problems: TaskSetConfig = field(
        default_factory=lambda: TaskSetConfig(
            tasks=["arith_mag"], levels=[2, 3], n_per_level=50, split="test"
        )
    )
    """Held-out questions (test split) of the per-round evaluation."""
    search: LoopSearchConfig = field(default_factory=LoopSearchConfig)
    eval_strategies: list[StrategySpec] = field(default_factory=_eval_strategies)
    """Strategies measured on the held-out questions each round, after greedy (scorer ``prm``:
    the round's PRM)."""
    mc: MCLabelConfig = field(default_factory=lambda: MCLabelConfig(n_chains=2, k=4, max_new_tokens=96))
    """Step labelling: ``n_chains`` = finished paths labelled per prompt, ``k`` rollouts per prefix."""
    sft: dict[str, Any] = field(
        default_factory=lambda: {"optim": {"lr": 1.0e-4, "warmup_steps": 0},
                                 "train": {"max_steps": 40, "batch_size": 8, "seq_len": 256, "save_every": 0}}
    )  # fmt: skip
    """`posttrain sft` recipe keys of the policy update (model, data and output_dir are set here)."""
    prm_train: dict[str, Any] = field(
        default_factory=lambda: {"optim": {"lr": 1.0e-3, "warmup_steps": 5},
                                 "train": {"max_steps": 60, "batch_size": 16, "save_every": 0}}
    )  # fmt: skip
    """`posttrain prm` recipe keys of the PRM update (model, data and output_dir are set here)."""
    trace_filter: str = "steps"
    """Which verified paths train the policy. ``outcome``: the final answer verifies. ``steps`` (default):
    it verifies and every step passes the task's step checker on that training problem (the
    analogue of rStar-Math's executed code steps): a right answer reached through a wrong step is
    not trained on. Training prompts only; the PRM's labels stay Monte-Carlo."""
    prm_eval_chains: int = 2
    """Chains per held-out question on which the PRM's step AUC is measured (0: not measured)."""
    output_dir: str = "runs/self_improve"
    """round_<r>/ folders, replay.jsonl, self_improve.json."""
    seed: int = 0
    """Torch seed set before every search."""

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}", where="rounds")
        if self.train_prompts.split != "train" or self.eval_problems.split != "test":
            raise ConfigError(
                "the loop trains on the train split and measures on the test split",
                where="train_prompts.split / eval_problems.split",
                fix="set train_prompts.split: train and eval_problems.split: test",
            )
        from posttrain.search.compare import check_scorer_name
        from posttrain.search.scorer_specs import AGGS

        if self.prm_agg not in AGGS:
            raise ConfigError(f"unknown prm_agg {self.prm_agg!r}", where="prm_agg", fix=f"one of {AGGS}")
        check_scorer_name(self.first_scorer, "first_scorer")
        if self.trace_filter not in TRACE_FILTERS:
            raise ConfigError(
                f"unknown trace_filter {self.trace_filter!r}",
                where="trace_filter",
                fix=f"one of {TRACE_FILTERS}",
            )
        for key, name in [("search.scorer", self.search.scorer)] + [
            (f"eval_strategies[{i}].scorer", s.scorer) for i, s in enumerate(self.eval_strategies)
        ]:
            if name not in (None, "prm"):
                check_scorer_name(name, key)


Loader = Callable[[str], tuple[Any, Any]]


def _load(recipe: SelfImproveRecipe) -> Loader:
    """`load_policy` with the recipe's model settings, for a given model path."""
    import dataclasses

    return lambda path: load_policy(dataclasses.replace(recipe.model, path=path))


@dataclass
class LoopState:
    """What carries from round to round."""

    policy: str
    prm: str | None


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary (token -> id)."""
    body = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def check_buffer_tokenizer(out: Path, tokenizer: Any) -> None:
    """Record the buffer's tokenizer on first use; a buffer of another tokenizer is a DataError."""
    path, mine = out / "replay.tokenizer.json", tokenizer_fingerprint(tokenizer)
    if not path.is_file():
        _atomic_json(path, {"vocab_sha": mine})
        return
    theirs = json.loads(path.read_text()).get("vocab_sha")
    if theirs != mine:
        raise DataError(
            f"the replay buffer {out / 'replay.jsonl'} was written with another tokenizer ({theirs} != {mine})",
            where=str(path),
            fix="use a fresh output_dir for this policy, or the policy the buffer was written with",
        )


def scorer_for_round(state: LoopState, recipe: SelfImproveRecipe, first: bool):
    """``spec -> scorer``: ``prm`` is the state's PRM (round 1 without one: ``first_scorer``)."""
    from posttrain.search.compare import scorer_cache
    from posttrain.search.scorer_specs import ScorerSpec, build_scorer, parse_scorer

    named = scorer_cache("none")
    prm = build_scorer(ScorerSpec("prm", state.prm, recipe.prm_agg)) if state.prm else None
    if prm is None and first:
        prm = build_scorer(parse_scorer(recipe.first_scorer, "first_scorer"))

    def scorer_for(spec: StrategySpec):
        return prm if spec.scorer == "prm" else named(spec)

    return scorer_for


def finished_paths(graph: Any) -> list[Any]:
    """A search graph's finished, non-lookahead paths with text."""
    return [n for n in graph.terminals() if n.kind != "lookahead" and graph.path_text(n).strip()]


def verify_finished(results: list, verify) -> tuple[int, int]:
    """Set every finished path's reward to its true outcome (1.0 / 0.0); (verified, finished) counts."""
    ok = total = 0
    for res in results:
        for n in finished_paths(res.graph):
            n.reward = float(bool(verify(res.graph.path_text(n), res.graph.meta)))
            ok += int(n.reward)
            total += 1
    return ok, total


def reject_wrong_steps(results: list, problems: list, step_sep: str) -> int:
    """Set the outcome of every verified path with a step its task's checker rejects to 0.0 (a
    lucky answer); how many were rejected. ``problems`` are task problems aligned with ``results``."""
    from posttrain.data.tasks import get_task
    from posttrain.search.mc_labels import step_cuts

    rejected = 0
    for res, problem in zip(results, problems, strict=True):
        check = get_task(problem.task).check_steps
        for n in finished_paths(res.graph):
            steps, _ = step_cuts(res.graph.path_text(n), step_sep)
            if n.reward == 1.0 and not (steps and all(check(problem, steps))):
                n.reward, rejected = 0.0, rejected + 1
    return rejected


def well_formed(chain: Any) -> bool:
    """A chain the PRM can train or be measured on: steps, a closed think block, an answer line,
    and no think tag inside a step (a degenerate sample renders as an empty reply)."""
    tags = ("<think>", "</think>")
    return bool(chain.steps) and bool(chain.final()) and not any(t in s for s in chain.steps for t in tags)


def round_texts(results: list, cap: int) -> list[tuple[int, str]]:
    """Up to ``cap`` distinct finished path texts per result: ``(query index, text)``."""
    out = []
    for i, res in enumerate(results):
        texts = list(dict.fromkeys(res.graph.path_text(n) for n in finished_paths(res.graph)))
        out += [(i, t) for t in texts[:cap]]
    return out


def search_and_label(
    recipe: SelfImproveRecipe, r: int, state: LoopState, policy, tokenizer, buffer, rdir: Path
):
    """Step 1-2 of a round: search the training prompts, verify, label steps, fill the buffer."""
    import dataclasses

    import torch

    from posttrain.search.base import queries_from_problems
    from posttrain.search.compare import grade, strategy_config
    from posttrain.search.export import export_sft
    from posttrain.search.mc_labels import chains_of_texts, label_chains, prm_records, value_records
    from posttrain.search.registry import run_search
    from posttrain.search.scorers import any_verifier

    problems = task_problems(dataclasses.replace(recipe.train_prompts, seed=recipe.train_prompts.seed + r))
    queries = queries_from_problems(problems, tokenizer)
    spec = StrategySpec(recipe.search.strategy, config=recipe.search.config, scorer=recipe.search.scorer)
    torch.manual_seed(recipe.seed + r)
    t0 = time.perf_counter()
    results = run_search(spec.name, policy, queries, scorer_for_round(state, recipe, r == 1)(spec),
                         strategy_config(spec, "search"))  # fmt: skip
    verify = any_verifier().verify
    ok, total = verify_finished(results, verify)
    lucky = reject_wrong_steps(results, problems, recipe.mc.step_sep) if recipe.trace_filter == "steps" else 0
    src = f"round{r}"
    added = {"trace": buffer.add([x.to_dict() for x in results], "trace", source=src),
             "sft": buffer.add(export_sft(results, 1.0, paths="all"), "sft", source=src)}  # fmt: skip
    t1 = time.perf_counter()
    mc = dataclasses.replace(recipe.mc, seed=None if recipe.mc.seed is None else recipe.mc.seed + r)
    given = [
        c for c in chains_of_texts(round_texts(results, mc.n_chains), queries, mc, verify) if well_formed(c)
    ]
    chains, stats = label_chains(policy, queries, mc, verify, given)
    added["prm"] = buffer.add(prm_records(chains, queries, mc.label), "prm", source=src)
    added["value"] = buffer.add(value_records(chains, queries, mc.k), "value", source=src)
    held = heldout_chains(recipe, policy, tokenizer, mc, verify, rdir) if ok else 0
    chosen = grade(results, problems)
    return {"prompts": len(problems), "strategy": spec.title(), "scorer": _scorer_name(state, recipe, r),
            "train_accuracy_of_choice": sum(chosen) / max(len(chosen), 1), "finished_paths": total,
            "verified_paths": ok, "rejected_wrong_step": lucky, "trace_filter": recipe.trace_filter,
            "added": added, "mc": asdict(stats), "heldout_prm_chains": held,
            "seconds_search": t1 - t0, "seconds_mc": time.perf_counter() - t1}  # fmt: skip


def _scorer_name(state: LoopState, recipe: SelfImproveRecipe, r: int) -> str:
    if recipe.search.scorer != "prm":
        return recipe.search.scorer
    return f"prm:{recipe.prm_agg}:{state.prm}" if state.prm else recipe.first_scorer if r == 1 else "none"


def heldout_chains(
    recipe: SelfImproveRecipe, policy, tokenizer, mc: MCLabelConfig, verify, rdir: Path
) -> int:
    """Chains the policy writes for test questions, with true step labels: the PRM's held-out set."""
    import dataclasses

    from posttrain.data.loaders import write_jsonl
    from posttrain.search.base import queries_from_problems
    from posttrain.search.mc_labels import oracle_records, sample_chains

    if recipe.prm_eval_chains < 1:
        return 0
    queries = queries_from_problems(task_problems(recipe.eval_problems), tokenizer)
    sampled = sample_chains(policy, queries, dataclasses.replace(mc, n_chains=recipe.prm_eval_chains), verify)
    rows = oracle_records([c for c in sampled if well_formed(c)], queries)
    if rows:
        write_jsonl(rdir / "prm_heldout.jsonl", rows)
    return len(rows)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_policy(recipe: SelfImproveRecipe, r: int, state: LoopState, buffer, rdir: Path) -> Path:
    """Step 3: SFT of the current policy on every verified trace in the buffer; its final/ folder."""
    from posttrain.config import from_dict
    from posttrain.data.loaders import write_jsonl
    from posttrain.train.sft import SFTRecipe, run_sft

    data = rdir / "sft.jsonl"
    write_jsonl(data, [{"messages": x["messages"]} for x in buffer.records("sft")])
    raw = _merge(recipe.sft, {"model": {"path": state.policy}, "data": {"train": str(data), "eval": None},
                              "output_dir": str(rdir / "sft"), "seed": recipe.seed + r})  # fmt: skip
    return run_sft(from_dict(SFTRecipe, raw, source="self-improve sft"))


def train_prm(recipe: SelfImproveRecipe, r: int, state: LoopState, buffer, rdir: Path) -> tuple[Path, dict]:
    """Step 4: a PRM on every MC record in the buffer; its final/ folder and held-out metrics."""
    from posttrain.config import from_dict
    from posttrain.data.loaders import write_jsonl
    from posttrain.train.prm import PRMRecipe, run_prm

    data, held = rdir / "prm.jsonl", rdir / "prm_heldout.jsonl"
    write_jsonl(data, buffer.records("prm"))
    raw = _merge(recipe.prm_train, {"model": {"path": state.policy},
                                    "data": {"train": str(data), "eval": str(held) if held.is_file() else None},
                                    "output_dir": str(rdir / "prm"), "seed": recipe.seed + r})  # fmt: skip
    final = run_prm(from_dict(PRMRecipe, raw, source="self-improve prm"))
    report = rdir / "prm" / "eval.json"
    return final, json.loads(report.read_text()) if report.is_file() else {}


def evaluate_round(
    recipe: SelfImproveRecipe, state: LoopState, loader: Loader | None = None
) -> dict[str, Any]:
    """Held-out (test split) greedy accuracy and each eval strategy's accuracy with the state's PRM."""

    from posttrain.search.base import queries_from_problems
    from posttrain.search.compare import run_strategies

    policy, tokenizer = (loader or _load(recipe))(state.policy)
    problems = task_problems(recipe.eval_problems)
    specs = [StrategySpec("greedy", config={"step": dict(_STEP)})]
    specs += [s for s in recipe.eval_strategies if s.scorer != "prm" or state.prm]
    t0 = time.perf_counter()
    rows = run_strategies(policy, queries_from_problems(problems, tokenizer), problems, specs,
                          scorer_for_round(state, recipe, False), recipe.seed)  # fmt: skip
    learned = [x.accuracy for x in rows[1:] if not x.oracle]
    return {"greedy_accuracy": rows[0].accuracy, "best_search_accuracy": max(learned) if learned else None,
            "rows": [x.to_dict() for x in rows], "seconds_eval": time.perf_counter() - t0}  # fmt: skip


def run_round(
    recipe: SelfImproveRecipe, r: int, state: LoopState, out: Path, loader: Loader | None = None
) -> dict[str, Any]:
    """One round (module docstring); the dict written to round_<r>/round.json."""
    from posttrain.search.replay import ReplayBuffer

    rdir = out / f"round_{r}"
    rdir.mkdir(parents=True, exist_ok=True)
    policy, tokenizer = (loader or _load(recipe))(state.policy)
    check_buffer_tokenizer(out, policy.tokenizer)
    buffer = ReplayBuffer(out / "replay.jsonl")
    found = search_and_label(recipe, r, state, policy, tokenizer, buffer, rdir)
    del policy
    base = {"round": r, "started_from": asdict(state), "search": found}
    if found["verified_paths"] - found["rejected_wrong_step"] == 0:
        reason = (f"no verified trace: none of the {found['finished_paths']} finished paths over "
                  f"{found['prompts']} training prompts verifies"
                  + (f" ({found['rejected_wrong_step']} right answers had a wrong step)"
                     if found["rejected_wrong_step"] else "") + "; policy and PRM carry over")  # fmt: skip
        console.print(f"[yellow]self-improve round {r} skipped[/yellow]: {reason}")
        return {**base, "skipped": reason, "policy": state.policy, "prm": state.prm}
    t0 = time.perf_counter()
    policy_dir = train_policy(recipe, r, state, buffer, rdir)
    t1 = time.perf_counter()
    prm_dir, prm_eval = train_prm(recipe, r, state, buffer, rdir)
    t2 = time.perf_counter()
    new = LoopState(str(policy_dir), str(prm_dir))
    return {**base, "policy": new.policy, "prm": new.prm, "sft_records": len(buffer.records("sft")),
            "prm_records": len(buffer.records("prm")), "prm_eval": prm_eval, "seconds_sft": t1 - t0,
            "seconds_prm": t2 - t1, **evaluate_round(recipe, new, loader)}  # fmt: skip


def summary_table(rounds: list[dict[str, Any]]) -> str:
    """A markdown table: one line per round (0 = the starting policy)."""
    lines = ["| round | greedy acc % | best learned search acc % | PRM step AUC | verified / finished paths | "
             "seconds |", "|---|---|---|---|---|---|"]  # fmt: skip
    for info in rounds:
        if "skipped" in info:
            lines.append(f"| {info['round']} | skipped: {info['skipped']} | | | | |")
            continue
        best = info.get("best_search_accuracy")
        auc = (info.get("prm_eval") or {}).get("after", {}).get("step_auc")
        found = info.get("search") or {}
        paths = f"{found['verified_paths']} / {found['finished_paths']}" if found else ""
        lines.append(f"| {info['round']} | {100 * info['greedy_accuracy']:.1f} | "
                     f"{'' if best is None else f'{100 * best:.1f}'} | {'' if auc is None else f'{auc:.3f}'} | "
                     f"{paths} | {info.get('seconds', 0.0):.0f} |")  # fmt: skip
    return "\n".join(lines)


def run_self_improve(recipe: SelfImproveRecipe, loader: Loader | None = None) -> Path:
    """Run (or resume) every round; returns OUTPUT_DIR/self_improve.json.

    ``loader(model_path) -> (policy, tokenizer or None)`` replaces `load_policy` (e.g. another
    generation engine); the policy must carry the model's ``tokenizer``."""
    from posttrain.config import dump_yaml

    recipe.validate()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(recipe))
    state = LoopState(recipe.model.path, recipe.prm)
    start = time.perf_counter()
    first = out / "round_0.json"
    if not first.is_file():
        t0 = time.perf_counter()
        info = {"round": 0, "policy": state.policy, "prm": state.prm, **evaluate_round(recipe, state, loader)}
        _atomic_json(first, {**info, "seconds": time.perf_counter() - t0})
    rounds = [json.loads(first.read_text())]
    for r in range(1, recipe.rounds + 1):
        path = out / f"round_{r}" / "round.json"
        if path.is_file():
            console.print(f"self-improve: round {r} finished before, skipped ({path})")
        else:
            t0 = time.perf_counter()
            info = run_round(recipe, r, state, out, loader)
            _atomic_json(path, {**info, "seconds": time.perf_counter() - t0})
        rounds.append(json.loads(path.read_text()))
        state = LoopState(rounds[-1]["policy"], rounds[-1]["prm"])
    result = out / "self_improve.json"
    greedy = [x["greedy_accuracy"] for x in rounds if "greedy_accuracy" in x]
    _atomic_json(result, {"rounds": rounds, "final_policy": state.policy, "final_prm": state.prm,
                          "greedy_rises_every_round": all(b > a for a, b in zip(greedy, greedy[1:], strict=False)),
                          "seconds_this_call": time.perf_counter() - start})  # fmt: skip
    table = summary_table(rounds)
    (out / "self_improve.md").write_text(
        f"# Self-improvement: {recipe.model.path}, {len(rounds) - 1} rounds\n\n{table}\n"
    )
    console.print(table)
    console.print(f"wrote {result}, {out / 'self_improve.md'}")
    return result


def self_improve_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """`posttrain self-improve RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe

    return run_self_improve(load_recipe(SelfImproveRecipe, recipe_path, overrides))
