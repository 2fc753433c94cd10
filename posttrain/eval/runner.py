"""``posttrain eval``: any model on any datasets, with pass@k / maj@k and bootstrap intervals.

`run_eval` loads every source (`posttrain.eval.data`), checks their scorers, then runs each
decoding over all problems in chunks of ``save_every``: generation batches through the rollout
engine (``get_engine("hf")``; greedy or n samples) or a registered search strategy
(`posttrain.search.run_search`) with its scorer; every sample is scored by its row's reward
(`posttrain.rewards.registry.score_batch`). After each chunk ``results.json`` is rewritten
(`posttrain.eval.results`), so a failure keeps the finished problems and a rerun of the same
recipe resumes after them; a completed run with the same recipe is returned as it is.

A sample is correct when its score >= ``success_threshold``. Its answer (for maj@k) is the
reward's ``info["answer"]`` when it gives one (``math``), else the ``Answer:`` line of the
completion (task-suite format); samples without one do not vote.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.eval.data import EvalDataConfig, EvalItem, load_items
from posttrain.eval.judge import JudgeConfig
from posttrain.eval.perplexity import PerplexityConfig
from posttrain.eval.results import DecodingRun, EvalState, write_results
from posttrain.search.compare import SearchModelConfig

SEARCH_SCORERS = ("reward", "verifier", "oracle_prm", "none")


@dataclass
class DecodingConfig:
    """One way to decode every problem: greedy, n samples, or a search strategy."""

    label: str = ""
    """Name in results.json and the report (default: ``greedy``, ``sample_n<n>_t<T>`` or the strategy)."""
    n: int = 1
    """Samples per problem (pass@k needs n >= k)."""
    temperature: float = 0.0
    """0: greedy; > 0: sampling (e.g. 0.8 with n = 20 for pass@10)."""
    top_p: float = 1.0
    """Nucleus mass (1: off)."""
    top_k: int = 0
    """Top-k truncation (0: off)."""
    max_new_tokens: int = 256
    """Generation budget per sample (a strategy's ``step.max_new_tokens`` unless its config sets it)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample (kept in its text), e.g. ``["\\n```\\n"]``: stop after a chat reply's
    first closing code fence instead of paying for the explanation after it (sampling only)."""
    seed: int = 0
    """Sampling seed (chunk c samples with seed + c, so a resumed run draws the same)."""
    k: list[int] | None = None
    """pass@k / maj@k to report (default: the recipe's ``k`` when n > 1, [1] when n = 1); each k <= n."""
    strategy: str | None = None
    """A registered search strategy (``posttrain.search.strategy_names()``) instead of sampling."""
    strategy_config: dict[str, Any] = field(default_factory=dict)
    """Keys of the strategy's config class."""
    scorer: str = "reward"
    """The strategy's scorer: ``reward`` (each row's own reward function), ``verifier`` and
    ``oracle_prm`` (task suite), ``none``, or a trained PRM/ORM folder."""

    def title(self) -> str:
        if self.label:
            return self.label
        if self.strategy:
            return self.strategy
        return (
            "greedy" if self.temperature == 0 and self.n == 1 else f"sample_n{self.n}_t{self.temperature:g}"
        )

    def ks(self, default: list[int]) -> list[int]:
        return list(self.k) if self.k is not None else (list(default) if self.n > 1 else [1])


@dataclass
class EvalRecipe:
    """`posttrain eval RECIPE.yaml`: a model, datasets, decodings and the metrics to report."""

    model: SearchModelConfig = field(default_factory=SearchModelConfig)
    """``path``: ``default``, a model folder or a run's ``final/``; ``prompt``: plain | chat | auto."""
    data: list[EvalDataConfig] = field(default_factory=lambda: [EvalDataConfig()])
    """Datasets, evaluated together (each its own source in the breakdowns)."""
    decodings: list[DecodingConfig] = field(default_factory=lambda: [DecodingConfig()])
    """Decodings, each run over every problem (e.g. greedy and n = 20 sampling)."""
    perplexity: list[PerplexityConfig] = field(default_factory=list)
    """Text or chat sets whose perplexity is reported (masked like SFT), as ``perplexity/<name>``;
    a perplexity-only recipe sets ``data: []``."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """An LLM judge over the decodings' responses: pointwise or pairwise (both orders); verdicts
    in ``judge.jsonl``, metrics as ``judge/<mode>``."""
    k: list[int] = field(default_factory=lambda: [1, 4, 8])
    """pass@k / maj@k for decodings with n > 1 (a decoding's own ``k`` wins)."""
    limit: int | None = None
    """At most this many problems per dataset, for every source (None: each source's own ``limit``)."""
    success_threshold: float = 1.0
    """A sample is correct when its score is >= this."""
    reference: bool = False
    """Grade each record's reference completion (HumanEval: the canonical solution) instead of
    generating: a check of the data and the grader (no model is loaded)."""
    save_every: int = 512
    """Problems per chunk; results.json is rewritten after each."""
    n_boot: int = 1000
    """Bootstrap resamples per interval."""
    seed: int = 0
    """Bootstrap seed."""
    output_dir: str = "runs/eval"
    """Run directory: results.json, report.md."""

    def validate(self) -> None:
        if not self.data and not self.perplexity:
            raise ConfigError("no datasets", where="data", fix="list at least one, e.g. - path: data.jsonl")
        names = [f"perplexity/{p.label()}" for p in self.perplexity]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"two perplexity sets are named {name!r}", where=f"perplexity[{i}].name",
                                  fix="give each a distinct name")  # fmt: skip
        self.judge.check(self.labels())
        if self.data and not self.decodings:
            raise ConfigError("no decodings", where="decodings", fix="list at least one, e.g. - n: 1")
        if self.save_every < 1:
            raise ConfigError("save_every must be >= 1", where="save_every")
        labels = [d.title() for d in self.decodings]
        for i, dec in enumerate(self.decodings):
            where = f"decodings[{i}]"
            if labels[i] in labels[:i]:
                raise ConfigError(f"two decodings are labelled {labels[i]!r}", where=f"{where}.label",
                                  fix="give each a distinct label")  # fmt: skip
            if dec.n < 1:
                raise ConfigError(f"n must be >= 1, got {dec.n}", where=f"{where}.n")
            for k in dec.ks(self.k):
                if not 1 <= k <= dec.n:
                    raise ConfigError(
                        f"pass@{k} / maj@{k} need k <= n, but n = {dec.n}",
                        where=f"{where}.k" if dec.k is not None else "k",
                        fix=f"set {where}.n >= {k}, or {where}.k to values <= {dec.n}",
                    )
            if dec.strategy is not None:
                _search_config(dec, where)
                if dec.stop:
                    raise ConfigError("stop strings apply to sampling, not to a search strategy",
                                      where=f"{where}.stop", fix="remove stop (a strategy's step config "
                                      "sets its own step separator)")  # fmt: skip
                if dec.n != 1:
                    raise ConfigError("a search strategy returns one answer per problem", where=f"{where}.n",
                                      fix="leave n at 1 (set the strategy's own n in strategy_config)")  # fmt: skip
                if dec.scorer not in SEARCH_SCORERS and not Path(dec.scorer).is_dir():
                    raise ConfigError(f"unknown search scorer {dec.scorer!r}", where=f"{where}.scorer",
                                      fix=f"use one of {', '.join(SEARCH_SCORERS)} or a PRM/ORM folder")  # fmt: skip

    def labels(self) -> list[str]:
        if not self.data:
            return []
        return ["reference"] if self.reference else [d.title() for d in self.decodings]


def _search_config(dec: DecodingConfig, where: str) -> Any:
    from posttrain.search.compare import StrategySpec, strategy_config

    return strategy_config(StrategySpec(dec.strategy or "greedy", config=dict(dec.strategy_config)), where)


class RowRewardScorer:
    """An outcome scorer for search: each finished path scored by its row's reward
    (``metadata["scorer"]``, through `score_batch`); unfinished paths get ``pending``."""

    num_parameters = 0

    def __init__(self, pending: float = 0.0):
        self.pending = pending

    def score(self, requests: list) -> list[list[float]]:
        from posttrain.rewards.registry import score_batch

        done = [i for i, r in enumerate(requests) if r.terminal]
        values = dict.fromkeys(range(len(requests)), self.pending)
        if done:
            res = score_batch([requests[i].prompt for i in done], [requests[i].text for i in done],
                              [requests[i].metadata for i in done])  # fmt: skip
            values.update({i: r.score for i, r in zip(done, res, strict=True)})
        return [[0.0] * max(len(r.steps) - 1, 0) + [values[i]] for i, r in enumerate(requests)]


@dataclass
class Decoder:
    """The loaded policy: engine, tokenizer (None: plain prompts), model path."""

    engine: Any
    tokenizer: Any
    path: str | None
    """The model folder (its generation_config.json gives stop ids); None for an in-memory model."""

    def prompt(self, item: EvalItem, text: bool = False) -> Any:
        """Chat messages (or the templated text), or the plain prompt."""
        if self.tokenizer is None:
            return item.plain if item.plain is not None else item.question + "\n"
        if text:
            return self.tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=False)
        return item.prompt


def load_decoder(cfg: SearchModelConfig) -> Decoder:
    from posttrain.rollout.sampling import SamplingParams
    from posttrain.search.compare import load_policy
    from posttrain.train.loop import resolve_model_path

    engine, tokenizer = load_policy(cfg)
    engine.generate(["1"], SamplingParams(temperature=0.0, max_new_tokens=2))  # warm-up, outside the timing
    return Decoder(engine, tokenizer, resolve_model_path(cfg.path))


def generate_chunk(dec: DecodingConfig, decoder: Decoder, items: list[EvalItem], chunk: int) -> list[tuple]:
    """Per item: ``(texts, token counts, finish reasons, extra tokens)`` from sampling or search."""
    from posttrain.rollout.engine import by_prompt
    from posttrain.rollout.sampling import eval_defaults

    if dec.strategy is None:
        params = eval_defaults(decoder.path, n=dec.n, temperature=dec.temperature, top_p=dec.top_p,
                               top_k=dec.top_k, max_new_tokens=dec.max_new_tokens, seed=dec.seed + chunk,
                               stop=list(dec.stop))  # fmt: skip
        groups = by_prompt(decoder.engine.generate([decoder.prompt(it) for it in items], params))
        return [([c.text for c in g], [len(c.token_ids) for c in g], [c.finish_reason for c in g], 0)
                for g in groups]  # fmt: skip
    import torch

    from posttrain.search.compare import make_scorer
    from posttrain.search.protocols import Query
    from posttrain.search.registry import run_search

    cfg = _search_config(dec, "decoding")
    if "max_new_tokens" not in (dec.strategy_config.get("step") or {}):
        cfg.step.max_new_tokens = dec.max_new_tokens
    scorer = RowRewardScorer() if dec.scorer == "reward" else make_scorer(dec.scorer, cfg.step.step_sep)
    queries = [Query(decoder.prompt(it, text=True), {**it.metadata, "question": it.question}) for it in items]
    torch.manual_seed(dec.seed + chunk)
    out = []
    for r in run_search(dec.strategy, decoder.engine, queries, scorer, cfg):
        n = len(decoder.engine.tokenizer(r.text, add_special_tokens=False)["input_ids"]) if r.text else 0
        out.append(([r.text], [n], ["stop"], max(r.cost.generated_tokens - n, 0)))
    return out


def score_runs(items: list[EvalItem], generated: list[tuple], threshold: float) -> list[DecodingRun]:
    """Score every sample by its row's reward; one `DecodingRun` per item."""
    from posttrain.data.tasks import extract_answer
    from posttrain.rewards.registry import score_batch

    prompts, texts, metas = [], [], []
    for item, (samples, *_rest) in zip(items, generated, strict=True):
        prompts += [item.prompt] * len(samples)
        texts += samples
        metas += [item.metadata] * len(samples)
    results = iter(score_batch(prompts, texts, metas))
    runs = []
    for samples, tokens, finish, extra in generated:
        rows = []
        for text, n, why_stop in zip(samples, tokens, finish, strict=True):
            res = next(results)
            answer = res.info.get("answer") if "answer" in res.info else extract_answer(text)
            rows.append({"text": text, "tokens": n, "score": res.score, "correct": res.score >= threshold,
                         "answer": None if answer is None else str(answer), "why": res.why,
                         "finish_reason": why_stop})  # fmt: skip
        runs.append(DecodingRun(rows, extra))
    return runs


def _previous(path: Path, config: dict) -> dict | None:
    """The earlier results.json of this same recipe, if any."""
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return old if old.get("config") == config else None


def run_eval(recipe: EvalRecipe, decoder: Decoder | None = None) -> Path:
    """Evaluate (module docstring); returns ``output_dir/results.json``. ``decoder``: an
    already loaded policy (a trainer's model, `posttrain.eval.hook`) instead of ``recipe.model``."""
    from posttrain.config import to_dict

    recipe.validate()
    out = Path(recipe.output_dir)
    config = json.loads(json.dumps(to_dict(recipe)))
    previous = _previous(out / "results.json", config)
    if previous is not None and previous.get("status") == "complete":
        print(f"eval: {out / 'results.json'} is complete for this recipe; nothing to do")
        return out / "results.json"
    sources = [replace(src, limit=recipe.limit) if recipe.limit is not None else src for src in recipe.data]
    items = [item for src in sources for item in load_items(src)]
    labels = recipe.labels()
    ks = {d.title(): d.ks(recipe.k) for d in recipe.decodings} if not recipe.reference else {"reference": [1]}
    state = EvalState(items, ks)
    if previous is not None:
        state.restore(previous.get("problems", []))
    if previous is not None:
        state.extra.update(
            {k: v for k, v in previous.get("metrics", {}).items() if k.startswith("perplexity/")}
        )
    try:
        decoder = _run_all(recipe, state, labels, out, config, decoder)
        _run_perplexity(recipe, state, decoder)
        _run_judge(recipe, state, labels, out)
    except BaseException as exc:
        write_results(
            out, state, config, "partial", recipe.n_boot, recipe.seed, error=f"{type(exc).__name__}: {exc}"
        )
        raise
    header = write_results(out, state, config, "complete", recipe.n_boot, recipe.seed)
    _print_summary(header, out)
    return out / "results.json"


def _run_all(
    recipe: EvalRecipe, state: EvalState, labels: list[str], out: Path, config: dict, decoder: Decoder | None
) -> Decoder | None:
    items = state.items
    if decoder is None and ((recipe.data and not recipe.reference) or recipe.perplexity):
        decoder = load_decoder(recipe.model)
    if decoder is not None:
        engine = decoder.engine
        used = getattr(engine, "precision", "fp32")
        state.precision = {"requested": recipe.model.precision, "used": used,
                           "reason": getattr(engine, "precision_reason", "")}  # fmt: skip
        print(f"eval: decoding in {used} ({state.precision['reason'] or 'the engine default'})")
    decodings = ([None] if recipe.reference else recipe.decodings) if recipe.data else []
    for label, dec in zip(labels, decodings, strict=True):
        for c, start in enumerate(range(0, len(items), recipe.save_every)):
            idx = [i for i in range(start, min(start + recipe.save_every, len(items)))
                   if i not in state.done.get(label, {})]  # fmt: skip
            if not idx:
                continue
            chunk = [items[i] for i in idx]
            t0 = time.perf_counter()
            if dec is None:
                generated = [([_reference(it)], [0], ["stop"], 0) for it in chunk]
            else:
                generated = generate_chunk(dec, decoder, chunk, c)
                state.add_time(label, time.perf_counter() - t0, sum(sum(g[1]) + g[3] for g in generated))
            for i, run in zip(idx, score_runs(chunk, generated, recipe.success_threshold), strict=True):
                state.record(label, i, run)
            write_results(out, state, config, "partial", recipe.n_boot, recipe.seed)
    return decoder


def _run_perplexity(recipe: EvalRecipe, state: EvalState, decoder: Decoder | None) -> None:
    """Each perplexity set not already in ``state.extra`` (a resumed run keeps finished ones)."""
    from posttrain.eval.perplexity import evaluate_perplexity

    for cfg in recipe.perplexity:
        label = f"perplexity/{cfg.label()}"
        if label in state.extra:
            continue
        engine = decoder.engine
        metrics, _ = evaluate_perplexity(cfg, engine.model, engine.tokenizer, recipe.n_boot, recipe.seed)
        state.extra[label] = metrics


def _run_judge(recipe: EvalRecipe, state: EvalState, labels: list[str], out: Path) -> None:
    """The judge section, once (a resumed run keeps its verdicts): metrics and ``judge.jsonl``."""
    from posttrain.eval.judge import run_judge
    from posttrain.eval.results import write_atomic

    key = f"judge/{recipe.judge.mode}"
    if recipe.judge.mode == "off" or key in state.extra:
        return
    metrics, rows = run_judge(recipe.judge, state, labels, recipe.n_boot, recipe.seed)
    write_atomic(out / "judge.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    state.extra[key] = metrics


def _reference(item: EvalItem) -> str:
    from posttrain.errors import DataError

    if item.reference is None:
        raise DataError("no reference completion to grade", where=item.where,
                        fix="add a 'reference' field to each record, or set reference: false")  # fmt: skip
    return item.reference


_SHOWN = ("accuracy", "pass@", "maj@", "perplexity", "score", "pass_rate", "win_rate", "position_consistency",
          "unparsable")  # fmt: skip


def _print_summary(header: dict, out: Path) -> None:
    for label, ms in header["metrics"].items():
        shown = ", ".join(
            f"{k} {m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
            for k, m in ms.items()
            if k.startswith(_SHOWN) and m["value"] is not None and m["value"] == m["value"]  # not NaN
        )
        t = header["timing"].get(label)
        speed = (
            f"; {t['generated_tokens']} tokens in {t['seconds']:.2f} s ({t['tokens_per_s']:.0f} tokens/s)"
            if t
            else ""
        )
        print(f"{label}: {shown}{speed}")
    print(f"results: {out / 'results.json'}; report: {out / 'report.md'}")


def eval_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """``posttrain eval RECIPE.yaml [key=value ...]``."""
    from posttrain.config import load_recipe

    return run_eval(load_recipe(EvalRecipe, recipe_path, overrides))


def short_recipe(
    model: str,
    data: list[str],
    n: int = 1,
    k: list[int] | None = None,
    strategy: str | None = None,
    output_dir: str = "runs/eval",
    temperature: float | None = None,
    max_new_tokens: int = 256,
    limit: int | None = None,
    reference: bool = False,
) -> EvalRecipe:
    """The recipe of ``posttrain eval MODEL --data FILE ...``: ``tasks`` as a FILE is the task
    suite, a ``.whl`` or ``HumanEval*.jsonl.gz`` HumanEval; n > 1 samples at ``temperature``
    (default 0.8); ``k`` defaults to those of 1, 4, 8 that are <= n."""
    if not data:
        raise ConfigError("no data to evaluate on", where="--data",
                          fix="pass --data FILE (repeatable), --data tasks for the task suite, or a recipe .yaml")  # fmt: skip
    sources = []
    for path in data:
        if path == "tasks":
            sources.append(EvalDataConfig())
        elif path.endswith(".whl") or Path(path).name.lower().startswith("humaneval"):
            sources.append(EvalDataConfig(path=path, format="humaneval"))
        else:
            sources.append(EvalDataConfig(path=path))
    temp = temperature if temperature is not None else (0.8 if n > 1 else 0.0)
    k = k if k is not None else [x for x in (1, 4, 8) if x <= n]
    dec = DecodingConfig(n=n, temperature=temp, max_new_tokens=max_new_tokens, k=k, strategy=strategy)
    return EvalRecipe(model=SearchModelConfig(path=model), data=sources, decodings=[dec], limit=limit,
                      reference=reference, output_dir=output_dir)  # fmt: skip


def eval_command(target: str, overrides: list[str], *, k: str | None = None, **options: Any) -> Path:
    """``posttrain eval``: a ``.yaml`` target is a recipe (`eval_main`); anything else is the
    model of the short form (`short_recipe` with ``options``), to which overrides apply too;
    ``harness="task1,task2"`` (``harness_include``: a folder of task YAMLs) evaluates the model
    with lm-evaluation-harness instead (`posttrain.eval.harness.run_harness`)."""
    harness, include = options.pop("harness", None), options.pop("harness_include", None)
    if harness:
        from posttrain.eval.harness import run_harness

        tasks = [t.strip() for t in harness.split(",") if t.strip()]
        return run_harness(
            target, tasks, options.get("output_dir", "runs/eval"), include, options.get("limit")
        )
    if target.endswith((".yaml", ".yml")):
        return eval_main(target, overrides)
    from posttrain.config import apply_override, from_dict, to_dict

    try:
        ks = [int(x) for x in k.split(",")] if k else None
    except ValueError:
        raise ConfigError(
            f"--k takes comma-separated integers, got {k!r}", where="--k", fix="e.g. --k 1,4,8"
        ) from None
    raw = to_dict(short_recipe(target, k=ks, **options))
    for item in overrides:
        apply_override(raw, item)
    return run_eval(from_dict(EvalRecipe, raw, source="command line"))
