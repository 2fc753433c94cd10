"""Compare search strategies on a task set: ``posttrain search RECIPE.yaml`` and `strategy_table`.

A `SearchRecipe` names a model, a task set from the task suite, a default scorer and a list of
strategies, each with its config and budget. Every strategy runs over all problems (batched,
`posttrain.search.run_search`), is graded by the tasks' true verifiers, and gives one
`StrategyRow`: accuracy, generated tokens (what its `Cost` counted, probes and critiques
included), policy and scorer calls, wall time. The run directory receives ``config.yaml``,
``results.json`` (rows, per-level accuracy, matched-compute ratios of compute_optimal against
best_of_n), ``plot.svg`` (accuracy vs generated tokens), ``results.html`` (the plot and the
table), and ``traces/<label>.jsonl`` (every search, reloadable with
`posttrain.search.traces.load_results`).

Scorers, by name (`posttrain.search.scorer_specs`): ``verifier`` and ``oracle_prm`` (oracles:
they know the answer), ``majority``, ``orm:PATH``, ``prm[:AGG]:PATH``, ``value:PATH``, ``none``.
A row whose strategy selects with an oracle is marked ``(oracle)`` and listed after the learned
rows, as the reference band: an upper bound, not a deployable method.

Problems come from the task suite (``tasks``) or a user prompt file (``prompts``: records with
``metadata.scorer`` and ``metadata.ground_truth``, `posttrain.search.prompt_files`).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from posttrain.errors import ConfigError
from posttrain.search.base import SearchResult, queries_from_problems
from posttrain.search.budget import Budget, total_cost
from posttrain.search.compute_optimal import BinPlan, ComputeOptimalConfig, calibrate, total_probe_cost
from posttrain.search.protocols import PolicyLike, Query, Scorer
from posttrain.search.registry import build_config, get_strategy, requires_scorer, run_search
from posttrain.search.report import (
    COLUMNS,
    ORACLE_NOTE,
    StrategyRow,
    compute_ratios,
    describe_ratio,
    html_page,
    ordered,
    row_cells,
    svg_plot,
)
from posttrain.search.scorer_specs import PLAIN_SCORERS, build_scorer, is_oracle, parse_scorer

SCORER_NAMES = PLAIN_SCORERS


@dataclass
class SearchModelConfig:
    """The policy model."""

    path: str = "default"
    """``default`` (the embedded model) or a model folder, e.g. runs/quickstart/sft/final."""
    prompt: Literal["auto", "plain", "chat"] = "auto"
    """``plain``: the question and a newline (the default model's pretraining format); ``chat``:
    the chat template's generation prompt; ``auto``: plain for ``default``, chat otherwise."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu``, ``cuda``..."""
    dtype: str = "auto"
    """Weights dtype (``auto``: as saved)."""
    max_batch_rows: int = 256
    """Prompts x samples decoded together by the HF engine."""
    precision: str = "auto"
    """Decoding precision: ``auto`` (bf16 autocast where the hardware computes bf16 natively, else
    fp32; `posttrain.train.precision`), ``fp32`` (exact, the same digits on every machine) or ``bf16``."""
    prefix_cache_tokens: int = 8192
    """Prompt keys/values kept across generate calls (`posttrain.rollout.prefix_cache`): a tree
    search's next step reuses its path's encoding. Memory: tokens x layers x 2 x KV heads x head
    size x bytes (SmolLM2-135M fp32: ~46 KB a token, 8192 tokens ~380 MB); 0 = off."""


@dataclass
class TaskSetConfig:
    """The problems: ``n_per_level`` of each level of each task, from a deterministic split."""

    tasks: list[str] = field(default_factory=lambda: ["arith"])
    """Task-suite names (``posttrain.data.tasks``)."""
    levels: list[int] | None = None
    """Levels to draw (None: every level of each task)."""
    n_per_level: int = 10
    """Problems per level."""
    split: Literal["train", "test"] = "test"
    """Which split (held-out ``test`` for evaluation)."""
    seed: int = 0
    """Seed of the split's random stream."""


@dataclass
class StrategySpec:
    """One strategy to compare: its registered name, config and budget."""

    name: str = "greedy"
    """A registered strategy (``posttrain.search.strategy_names()``)."""
    label: str = ""
    """Display name (default: the name and the config's scalar values); labels must differ."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keys of the strategy's config class."""
    budget: Budget | None = None
    """Hard per-problem budget (same as ``config.budget``; give one of the two)."""
    scorer: str | None = None
    """This strategy's scorer (default: the recipe's)."""
    series: str = ""
    """Plot line this row joins (default: the strategy name), e.g. to keep variants that are not
    one budget sweep apart."""

    def title(self) -> str:
        if self.label:
            return self.label
        keys = ",".join(f"{k}={v}" for k, v in self.config.items() if not isinstance(v, dict | list))
        return f"{self.name}({keys})" if keys else self.name


@dataclass
class CalibrationConfig:
    """Fit the bins of every compute_optimal strategy on a labelled split before the run."""

    n_per_level: int = 0
    """Calibration problems per level (same tasks and levels, ``split``); 0 = no fitting."""
    split: Literal["train", "test"] = "train"
    """Split of the calibration problems (train: disjoint from the test set)."""
    candidates: list[BinPlan] = field(default_factory=list)
    """Plans to choose from per bin (empty: the strategy's own bins)."""
    max_tokens: float | None = None
    """Generated tokens per problem a bin's plan may use, probe included (None = no limit)."""


def default_strategies() -> list[StrategySpec]:
    return [StrategySpec("greedy"), StrategySpec("self_consistency", config={"n": 4}),
            StrategySpec("best_of_n", config={"n": 4, "select": "verifier"})]  # fmt: skip


@dataclass
class SearchRecipe:
    """`posttrain search RECIPE.yaml`: every key of a strategy comparison."""

    model: SearchModelConfig = field(default_factory=SearchModelConfig)
    tasks: TaskSetConfig = field(default_factory=TaskSetConfig)
    prompts: str | None = None
    """A prompt file (JSONL / JSON / Parquet / HF folder of ``{prompt, metadata: {scorer,
    ground_truth}}``) to search instead of ``tasks``."""
    prompts_limit: int | None = None
    """Use only the first N records of ``prompts``."""
    scorer: str = "verifier"
    """Default scorer: ``verifier``, ``oracle_prm``, ``majority``, ``orm:PATH``, ``prm[:AGG]:PATH``,
    ``value:PATH`` or ``none`` (module docstring)."""
    strategies: list[StrategySpec] = field(default_factory=default_strategies)
    """Strategies to compare, in table order."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    output_dir: str = "runs/search"
    """Run directory (results.json, plot.svg, results.html, traces/)."""
    seed: int = 0
    """Torch seed set before each strategy (sampling is reproducible and order-independent)."""
    save_traces: bool = True
    """Write every search to traces/<label>.jsonl."""

    def validate(self) -> None:
        if not self.strategies:
            raise ConfigError(
                "no strategies to run", where="strategies", fix="list at least one, e.g. - name: greedy"
            )
        check_scorer_name(self.scorer, "scorer")
        labels = [s.title() for s in self.strategies]
        for i, spec in enumerate(self.strategies):
            strategy_config(spec, f"strategies[{i}]")
            scorer = spec.scorer if spec.scorer is not None else self.scorer
            check_scorer_name(scorer, f"strategies[{i}].scorer")
            if scorer == "none" and requires_scorer(get_strategy(spec.name), strategy_config(spec)):
                raise ConfigError(
                    f"strategy {spec.name!r} with this config needs a scorer, and the scorer is none",
                    where=f"strategies[{i}]",
                    fix="set scorer: verifier (the true verifier), oracle_prm, or a PRM folder "
                    "(for the whole recipe or this strategy), or a config that needs none",
                )
            if labels[i] in labels[:i]:
                raise ConfigError(f"two strategies are labelled {labels[i]!r}", where=f"strategies[{i}].label",
                                  fix="give each a distinct label")  # fmt: skip


def check_scorer_name(name: str, where: str) -> None:
    """A ConfigError at ``where`` if ``name`` is no scorer (`posttrain.search.scorer_specs`)."""
    parse_scorer(name, where)


def strategy_config(spec: StrategySpec, where: str = "strategy") -> Any:
    """The spec's strategy config, parsed strictly, with ``budget`` applied."""
    try:
        strategy = get_strategy(spec.name)
    except ConfigError as exc:
        raise ConfigError(exc.message, where=f"{where}.name", fix=exc.fix) from None
    if spec.budget is not None and "budget" in spec.config:
        raise ConfigError("budget given twice", where=f"{where}.budget", fix="keep budget or config.budget")
    try:
        cfg = build_config(strategy, spec.config)
    except ConfigError as exc:
        raise ConfigError(f"{spec.name}: {exc.message}", where=f"{where}.config", fix=exc.fix) from None
    if spec.budget is not None:
        cfg.budget = spec.budget
    return cfg


def make_scorer(name: str | Scorer | None, step_sep: str = "<step>") -> Scorer | None:
    """A scorer by name (module docstring); a `Scorer` object passes through. ``step_sep`` is
    where the oracle PRM splits steps (the strategy's ``step.step_sep``)."""
    if name is None or name == "none":
        return None
    if not isinstance(name, str):
        return name
    return build_scorer(parse_scorer(name, "scorer"), step_sep)


def scorer_cache(default: str | Scorer | None) -> Callable[[StrategySpec], Scorer | None]:
    """``spec -> scorer``: the spec's named scorer, else ``default``; each built once (a PRM loads once)."""
    cache: dict[tuple[str, str], Scorer | None] = {}

    def scorer_for(spec: StrategySpec) -> Scorer | None:
        name = spec.scorer if spec.scorer is not None else default
        if not isinstance(name, str | None):
            return name
        key = (name or "none", strategy_config(spec).step.step_sep)
        if key not in cache:
            cache[key] = make_scorer(*key)
        return cache[key]

    return scorer_for


def task_problems(cfg: TaskSetConfig, split: str | None = None, n_per_level: int | None = None) -> list:
    """The problems of a task set (tasks in order, levels in order)."""
    from posttrain.data.tasks import task_problems as problems_of

    n = cfg.n_per_level if n_per_level is None else n_per_level
    return problems_of(cfg.tasks, split or cfg.split, n, cfg.seed, cfg.levels)


def load_policy(cfg: SearchModelConfig) -> tuple[PolicyLike, Any]:
    """The HF rollout engine over the model, and the tokenizer to build chat prompts with (None: plain)."""
    from posttrain.rollout.engine import get_engine
    from posttrain.train.loop import resolve_model_path

    engine = get_engine("hf", model=resolve_model_path(cfg.path), dtype=cfg.dtype, device=cfg.device,
                        max_batch_rows=cfg.max_batch_rows, precision=cfg.precision,
                        prefix_cache_tokens=cfg.prefix_cache_tokens)  # fmt: skip
    chat = cfg.prompt == "chat" or (cfg.prompt == "auto" and cfg.path != "default")
    return engine, engine.tokenizer if chat else None


def grade(results: Sequence[SearchResult], problems: Sequence[Any]) -> list[bool]:
    """Whether each result's text passes its problem's true verifier (a prompt record's: its scorer)."""
    from posttrain.data.tasks import get_task

    return [bool(p.verify(r.text) if hasattr(p, "verify") else get_task(p.task).verify(r.text, p.answer))
            for r, p in zip(results, problems, strict=True)]  # fmt: skip


def summarize_row(label: str, name: str, results, problems, ok: list[bool], seconds: float) -> StrategyRow:
    """A `StrategyRow` from one strategy's results and grades."""
    cost = total_cost([r.cost for r in results])
    correct, total = defaultdict(int), defaultdict(int)
    for p, good in zip(problems, ok, strict=True):
        correct[f"{p.task}/L{p.level}"] += good
        total[f"{p.task}/L{p.level}"] += 1
    extra: dict[str, Any] = {}
    if name == "compute_optimal":
        bins = Counter(r.outcome.get("bin") for r in results)
        extra = {"bins": {str(b): n for b, n in sorted(bins.items())},
                 "plans": sorted({r.outcome.get("plan", "") for r in results}),
                 "probe_tokens": total_probe_cost(results).generated_tokens}  # fmt: skip
    return StrategyRow(label, name, len(results), sum(ok), cost.generated_tokens, cost.prompt_tokens,
                       cost.policy_calls, cost.scorer_calls, cost.flops, seconds,
                       {k: correct[k] / total[k] for k in sorted(total)}, extra)  # fmt: skip


def run_strategies(
    policy: PolicyLike,
    queries: Sequence[Query],
    problems: Sequence[Any],
    specs: Sequence[StrategySpec],
    scorer_for: Callable[[StrategySpec], Scorer | None],
    seed: int = 0,
    traces: Path | None = None,
) -> list[StrategyRow]:
    """Run every spec over all queries; one graded row each (traces saved under ``traces``).

    An untimed two-token call warms the engine up first; the torch seed is reset before each spec.
    """
    import torch

    from posttrain.rollout.sampling import SamplingParams
    from posttrain.search.traces import save_results

    if queries:  # one untimed call first, so the first strategy's time holds no warm-up
        policy.generate([queries[0].prompt], SamplingParams(temperature=0.0, max_new_tokens=2))
    rows = []
    for spec in specs:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        scorer, cfg = scorer_for(spec), strategy_config(spec)
        results = run_search(spec.name, policy, queries, scorer, cfg)
        seconds = time.perf_counter() - t0
        row = summarize_row(spec.title(), spec.name, results, problems, grade(results, problems), seconds)
        oracle = is_oracle(scorer) and requires_scorer(get_strategy(spec.name), cfg)
        rows.append(replace(row, series=spec.series, oracle=oracle))
        if traces is not None:
            save_results(traces / f"{safe_name(spec.title())}.jsonl", results)
    return rows


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)[:120]


def calibrate_specs(
    specs: Sequence[StrategySpec], cal: CalibrationConfig, policy, queries, problems, scorer_for
) -> tuple[list[StrategySpec], dict[str, Any]]:
    """Fit the bins of every compute_optimal spec on the calibration problems; the fitted specs
    and, per label, the accuracy/tokens table and chosen plans."""
    out, report = [], {}
    by_text = {q.prompt: p for q, p in zip(queries, problems, strict=True)}

    def right(r: SearchResult) -> bool:
        return grade([r], [by_text[r.graph.prompt]])[0]

    for spec in specs:
        if spec.name != "compute_optimal":
            out.append(spec)
            continue
        cfg: ComputeOptimalConfig = strategy_config(spec)
        fitted, table = calibrate(policy, queries, cfg, cal.candidates or list(cfg.bins), right,
                                  scorer_for(spec), cal.max_tokens)  # fmt: skip
        bins = [{"strategy": b.strategy, "config": b.config} for b in fitted.bins]
        report[spec.title()] = {"table": table, "bins": [b.describe() for b in fitted.bins]}
        out.append(replace(spec, config={**spec.config, "bins": bins}))
    return out, report


def strategy_table(
    model_path: str,
    problems: Sequence[Any],
    strategies: Sequence[StrategySpec | dict[str, Any]] | None = None,
    scorer: str | Scorer | None = "verifier",
    *,
    prompt: Literal["auto", "plain", "chat"] = "auto",
    device: str = "auto",
    seed: int = 0,
) -> list[StrategyRow]:
    """Accuracy and token cost of each strategy on ``problems`` with the model at ``model_path``.

    ``strategies``: specs or dicts with `StrategySpec`'s keys (default: `quickstart_strategies`);
    ``scorer``: the default scorer, a name (module docstring) or a `Scorer`; a spec's own
    ``scorer`` name wins. Format the rows with `posttrain.search.report.format_markdown`.
    """
    from posttrain.config import from_dict

    specs = [s if isinstance(s, StrategySpec) else from_dict(StrategySpec, s, prefix="strategies.")
             for s in (quickstart_strategies() if strategies is None else strategies)]  # fmt: skip
    policy, tokenizer = load_policy(SearchModelConfig(path=model_path, prompt=prompt, device=device))
    scorer_for = scorer_cache(scorer)
    queries = queries_from_problems(problems, tokenizer)
    return run_strategies(policy, queries, problems, specs, scorer_for, seed)


def quickstart_strategies(
    prm: str = "oracle_prm", n: int = 8, step_sep: str = "<step>"
) -> list[StrategySpec]:
    """Greedy, self-consistency, best-of-N at two budgets (true verifier), PRM beam, PRM MCTS and
    compute-optimal, for `strategy_table`.

    ``prm`` scores beam and MCTS steps (``oracle_prm`` or a trained PRM folder). Compute-optimal
    probes ``n // 2`` chains and grades them with the true verifier, like best-of-N: a prompt
    with a verified probe chain is answered by it (no more compute), the others get ``n`` more
    samples -- so it compares with best-of-N at matched tokens and the same scorer.
    """
    step = {"max_step_tokens": 24, "max_new_tokens": 96, "max_depth": 8, "step_sep": step_sep}
    half = max(1, n // 2)
    bins = [{"strategy": "probe"}, {"strategy": "best_of_n", "config": {"n": n, "select": "verifier"}}]
    co = {"probe_n": half, "difficulty": "score", "probe_select": "score", "edges": [1.0], "bins": bins}
    bon = {"select": "verifier", "step": step}
    return [
        StrategySpec("greedy", config={"step": step}),
        StrategySpec("self_consistency", label=f"self_consistency(n={n})", config={"n": n, "step": step}),
        StrategySpec("best_of_n", label=f"best_of_n(n={half})", config={"n": half, **bon}, scorer="verifier"),
        StrategySpec("best_of_n", label=f"best_of_n(n={n})", config={"n": n, **bon}, scorer="verifier"),
        StrategySpec(
            "beam", label="prm_beam", config={"beam_width": 2, "expand_k": 4, "step": step}, scorer=prm
        ),
        StrategySpec(
            "mcts", label="prm_mcts", config={"n_simulations": 8, "expand_k": 3, "step": step}, scorer=prm
        ),
        StrategySpec(
            "compute_optimal", label="compute_optimal", config={**co, "step": step}, scorer="verifier"
        ),
    ]


def run_search_recipe(recipe: SearchRecipe) -> Path:
    """Run a `SearchRecipe`: the table on the console, results.json, plot.svg, results.html, traces."""
    from posttrain.config import dump_yaml

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(recipe))
    problems = recipe_problems(recipe)
    policy, tokenizer = load_policy(recipe.model)
    scorer_for = scorer_cache(recipe.scorer)

    specs, fitted = list(recipe.strategies), {}
    if recipe.calibration.n_per_level > 0:
        cal = task_problems(recipe.tasks, recipe.calibration.split, recipe.calibration.n_per_level)
        specs, fitted = calibrate_specs(specs, recipe.calibration, policy,
                                        queries_from_problems(cal, tokenizer), cal, scorer_for)  # fmt: skip
    queries = problem_queries(problems, tokenizer)
    traces = out / "traces" if recipe.save_traces else None
    rows = run_strategies(policy, queries, problems, specs, scorer_for, recipe.seed, traces)
    write_outputs(out, rows, fitted, len(problems), recipe.model.path)
    return out


def recipe_problems(recipe: SearchRecipe) -> list:
    """The recipe's prompt file as `PromptProblem`s, else its task set."""
    if recipe.prompts:
        from posttrain.search.prompt_files import load_prompt_problems

        return load_prompt_problems(recipe.prompts, recipe.prompts_limit)
    return task_problems(recipe.tasks)


def problem_queries(problems: Sequence[Any], tokenizer: Any = None) -> list[Query]:
    """Queries of task problems or prompt-file problems."""
    from posttrain.search.prompt_files import PromptProblem, prompt_queries

    if problems and isinstance(problems[0], PromptProblem):
        return prompt_queries(problems, tokenizer)
    return queries_from_problems(problems, tokenizer)


def write_outputs(out: Path, rows: list[StrategyRow], fitted: dict, n_problems: int, model: str) -> None:
    """results.json, plot.svg and results.html in ``out``; the table on the console."""
    from rich.console import Console
    from rich.table import Table

    ratios = compute_ratios(rows)
    title = f"Accuracy vs compute: {model}, {n_problems} problems"
    svg = svg_plot(rows, title)
    (out / "plot.svg").write_text(svg)
    (out / "results.html").write_text(html_page(title, svg, rows, ratios))
    data = {"model": model, "problems": n_problems, "rows": [r.to_dict() for r in rows],
            "compute_ratios": ratios, "calibration": fitted}  # fmt: skip
    (out / "results.json").write_text(json.dumps(data, indent=1))
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "strategy" else "right", no_wrap=c == "strategy")
    shown = ordered(rows)
    for i, r in enumerate(shown):
        table.add_row(*row_cells(r), end_section=i + 1 < len(shown) and shown[i + 1].oracle and not r.oracle)
    console = Console()
    console = Console(width=max(console.width, 120))  # a piped run is 80 columns wide by default
    console.print(table)
    if any(r.oracle for r in rows):
        console.print(ORACLE_NOTE)
    for r in ratios:
        console.print(describe_ratio(r))
    console.print(f"wrote {out / 'results.json'}, {out / 'plot.svg'}, {out / 'results.html'}")


def search_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """CLI entry: `posttrain search RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe

    return run_search_recipe(load_recipe(SearchRecipe, recipe_path, overrides))
