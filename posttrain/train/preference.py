"""Offline preference optimisation (DPO and its variants, SimPO, ORPO, KTO): a plain loop over library calls.

One optimiser step: every example of the micro-batches goes through ONE
forward (chosen and rejected share their prompt, `preference_data`), the
registered loss (`posttrain.algos.preference_losses`) gets summed or
per-token-mean log-probs as it asks, optionally plus ``nll_weight`` times the
chosen NLL, and the loop of `posttrain.train.loop` does accumulation, clipping,
checkpoints and logging.

The reference policy pi_ref never lives in memory as a second model:
- ``adapter``: with a LoRA / IA3 adapter, pi_ref is the same model with the
  adapter disabled (a no-grad forward per step);
- ``precompute``: one no-grad pass over the data before training stores every
  response's pi_ref log-prob in RUN_DIR/reference/{train,eval}.pt (keyed by
  example index, guarded by a hash of the tokens, reused on resume);
- ``auto`` picks the cheaper: precompute for full fine-tuning, when the
  perplexity filter runs (its pass already scores every response under pi_ref),
  or when training sees every example at least once; otherwise adapter.

The perplexity filter (seed 001 2.2.2) drops examples whose chosen (or either)
response has perplexity under pi_ref above ``max_ppl`` or above the
``percentile``-th percentile, and writes RUN_DIR/filter/{kept,dropped}.jsonl.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from posttrain.algos.preference_losses import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    chosen_nll,
    get_preference_loss,
)
from posttrain.data.quality.perplexity import perplexity_keep  # one threshold rule for data clean and DPO
from posttrain.data.quality.section import CleanSection, clean_data
from posttrain.distributed.config import DistributedConfig
from posttrain.distributed.launch import refuse_fsdp_eval_recipe
from posttrain.distributed.parallel import all_reduce_sum, call, grad_sync, is_main, main_first, rank, world
from posttrain.distributed.trainer import export_final
from posttrain.errors import ConfigError
from posttrain.eval.hook import EvalHookConfig, with_recipe_eval
from posttrain.models.peft import PeftConfig, export_model
from posttrain.monitor.logger import console
from posttrain.train.anomaly import AnomalyConfig
from posttrain.train.loop import (
    LoopConfig,
    ModelConfig,
    Run,
    _to,
    prepare_run,
    run_loop,
    total_steps,
)
from posttrain.train.optim import OptimConfig
from posttrain.train.precision import autocast
from posttrain.train.preference_data import (
    ExamplePlan,
    PreferenceDataConfig,
    build_examples,
    cached_scores,
    example_logprobs,
    reference_context,
    score_examples,
)

log = logging.getLogger(__name__)
ADAPTER_METHODS = ("lora", "qlora", "ia3")


@dataclass
class PreferenceLossConfig:
    """Which registered preference loss, and its hyper-parameters (null = the loss's paper default)."""

    name: str = "sigmoid"
    """sigmoid (DPO) | cdpo | robust | ipo | hinge | simpo | orpo | kto, or a name added with register_preference_loss."""
    beta: float | None = None
    """Inverse temperature of the implicit reward (DPO family, SimPO, KTO); IPO's tau; ORPO's lambda."""
    label_smoothing: float | None = None
    """Assumed label-flip rate eps (cdpo, robust)."""
    target_margin: float | None = None
    """SimPO's target reward margin gamma."""
    desirable_weight: float | None = None
    """KTO's lambda_D."""
    undesirable_weight: float | None = None
    """KTO's lambda_U."""
    nll_weight: float = 0.0
    """Weight of an extra per-token NLL term on the chosen (desirable) responses (RPO); 0 = off."""

    def validate(self) -> None:
        if self.name not in PREFERENCE_LOSSES:
            raise ConfigError(
                f"unknown preference loss {self.name!r}",
                where="loss.name",
                fix=f"use one of: {', '.join(sorted(PREFERENCE_LOSSES))}",
            )
        params = get_preference_loss(self.name).params
        for key in ("beta", "label_smoothing", "target_margin", "desirable_weight", "undesirable_weight"):
            if getattr(self, key) is not None and key not in params:
                raise ConfigError(
                    f"loss {self.name!r} does not use {key}",
                    where=f"loss.{key}",
                    fix=f"remove it; {self.name} reads: {', '.join(params) or 'nothing'}",
                )
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}", where="loss.beta")
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"label_smoothing is a label-flip rate in [0, 0.5), got {self.label_smoothing}",
                where="loss.label_smoothing",
            )
        if self.nll_weight < 0:
            raise ConfigError("nll_weight must be >= 0", where="loss.nll_weight")

    def kwargs(self) -> dict[str, float]:
        """The keyword arguments for the loss function: set values, else the loss's defaults."""
        params = get_preference_loss(self.name).params
        return {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in params.items()}


@dataclass
class ReferenceConfig:
    """Where pi_ref log-probs come from (see the module docstring)."""

    mode: Literal["auto", "adapter", "precompute"] = "auto"
    """auto | adapter (LoRA/IA3: the model with its adapter disabled) | precompute (one cached pass)."""
    batch_size: int = 32
    """Examples per batch of the precompute and eval passes."""


@dataclass
class PerplexityFilterConfig:
    """Drop examples whose responses pi_ref finds implausible (off unless a threshold is set)."""

    max_ppl: float | None = None
    """Drop when a checked response's perplexity under pi_ref is above this."""
    percentile: float | None = None
    """Drop when a checked response's perplexity is above this percentile (0-100) of all checked ones."""
    on: Literal["chosen", "either"] = "chosen"
    """Check the chosen (desirable) response only, or every response."""

    def validate(self) -> None:
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise ConfigError(
                f"percentile must be in (0, 100), got {self.percentile}", where="filter.percentile"
            )
        if self.max_ppl is not None and self.max_ppl <= 1:
            raise ConfigError(f"max_ppl must be > 1, got {self.max_ppl}", where="filter.max_ppl")

    @property
    def enabled(self) -> bool:
        return self.max_ppl is not None or self.percentile is not None


@dataclass
class PreferenceEvalConfig:
    """Held-out evaluation: preference accuracy on eval pairs and task accuracy of the policy."""

    task_accuracy_n: int = 25
    """Held-out problems per task and level for greedy task accuracy (data.eval=tasks only; 0 = off)."""
    max_new_tokens: int = 128
    """Generation budget of the task-accuracy eval."""
    before: bool = True
    """Also evaluate the starting model (step 0) so the report shows before and after."""
    recipe: str | None = None
    """An eval recipe (`posttrain eval` YAML) run on the policy every eval step: the user's own
    held-out metrics under ``eval/`` (results in ``RUN_DIR/eval/step_<step>/``). None: off."""
    recipe_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides applied to that recipe (e.g. ``limit=50``)."""


@dataclass
class PreferenceRecipe:
    """`posttrain preference RECIPE.yaml`: every key of a preference-optimisation recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    clean: CleanSection | None = None
    """Clean data.train with `posttrain data clean`'s steps before training (cached; null: off)."""
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    filter: PerplexityFilterConfig = field(default_factory=PerplexityFilterConfig)
    eval: PreferenceEvalConfig = field(default_factory=PreferenceEvalConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes (DDP; FSDP for full fine-tuning): `distributed.nproc=2`, or launch with
    torchrun. Each rank takes its share of every global micro-batch's examples (`shard_examples`)."""
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """What counts as a run gone wrong (loss divergence, grad-norm spike) and what then: pause with
    a checkpoint (exit 75), warn, or roll back at a lower lr (`posttrain.train.anomaly`)."""
    output_dir: str = "runs/preference"
    """Run directory: config.yaml, metrics.jsonl, reference/, filter/, checkpoints/, final/."""
    seed: int = 0
    """Seed for data order and initialisation of new parameters."""
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir if there is one."""

    def validate(self) -> None:
        if self.peft.method in ("prefix", "prompt"):
            raise ConfigError(
                f"peft.method={self.peft.method} prepends virtual tokens, which the shared-prompt layout cannot mask",
                where="peft.method",
                fix="use lora, ia3, bitfit or full",
            )
        if self.reference.mode == "adapter" and self.peft.method not in ADAPTER_METHODS:
            raise ConfigError(
                f"reference.mode=adapter needs an adapter to disable; peft.method={self.peft.method} has none",
                where="reference.mode",
                fix="use reference.mode=precompute (no second model either) or peft.method=lora",
            )


# ---------------------------------------------------------------- reference log-probs and the filter


def apply_filter(run_dir: Path, examples: list, sums, counts, cfg: PerplexityFilterConfig) -> list[int]:
    """Indices of the examples that pass the perplexity filter; writes RUN_DIR/filter/{kept,dropped}.jsonl."""
    ppl = torch.exp(-sums / counts.clamp(min=1))
    checked = torch.zeros_like(ppl, dtype=torch.bool)
    unpaired = examples[0].label is not None
    checked[:, 0] = torch.tensor([e.label is not False for e in examples]) if cfg.on == "chosen" else True
    checked[:, 1] = cfg.on == "either" and not unpaired
    keep, threshold = perplexity_keep(ppl, checked, cfg.max_ppl, cfg.percentile)
    names = ["completion", "kl"] if unpaired else ["chosen", "rejected"]
    rows, reasons = {True: [], False: []}, defaultdict(int)
    for i, e in enumerate(examples):
        row = {"index": i, "where": e.where, "ppl": [round(float(p), 4) for p in ppl[i]]}
        if not keep[i]:
            over = "+".join(names[j] for j in range(2) if checked[i, j] and ppl[i, j] > threshold)
            row["reason"], reasons[over] = f"{over} ppl > {threshold:.4g}", reasons[over] + 1
        rows[bool(keep[i])].append(row)
    out = run_dir / "filter"
    if not is_main():  # several processes: every rank keeps the same examples; rank 0 writes
        return [r["index"] for r in rows[True]]
    out.mkdir(exist_ok=True)
    for name, kept in (("kept", True), ("dropped", False)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[kept]))
    why = "".join(f"; {n} for {k} perplexity" for k, n in sorted(reasons.items()))
    console.print(
        f"perplexity filter (on {cfg.on}, threshold {threshold:.4g}): dropped {len(rows[False])} of "
        f"{len(examples)}{why}; lists in {out}"
    )
    return [r["index"] for r in rows[True]]


# ---------------------------------------------------------------- the loss on a batch


def batch_loss(
    model,
    batch,
    spec: PreferenceLoss,
    kwargs: dict,
    nll_weight: float,
    reference,
    chunk_size: int,
    shard_real: bool | None = None,
):
    """Loss and metrics of one batch of examples.

    reference: (sums (N, k), counts (N, k)) cached for all examples, "adapter" (score the batch
    with the adapter disabled) or None (reference-free loss).
    shard_real: None = the batch is the whole batch (one process, evaluation); True / False =
    this rank's share of a global micro-batch (False: a zero-weight stand-in). Then KTO's
    reference point z0 is the mean over all ranks' shards, as one process computes it.
    """
    sums, counts = example_logprobs(model, batch, chunk_size)
    e = batch["example_index"].numel()
    sums, counts = sums.view(e, -1), counts.view(e, -1).clamp(min=1)
    ref = None
    if reference == "adapter":
        with torch.no_grad(), reference_context(model):
            ref = example_logprobs(model, batch, chunk_size)[0].view(e, -1)
    elif reference is not None:
        ref = reference[0][batch["example_index"].cpu()].to(sums.device)
    values = sums / counts if spec.average else sums
    ref_values = None if ref is None else (ref / counts if spec.average else ref)
    pick = (lambda t, j: None) if ref_values is None else (lambda t, j: t[:, j])  # noqa: E731
    if spec.paired:
        loss, m = spec.fn(values[:, 0], values[:, 1], pick(ref_values, 0), pick(ref_values, 1), **kwargs)
        m.update({"logps/chosen": sums[:, 0].detach(), "logps/rejected": sums[:, 1].detach()})
        m["logps/accuracy"] = (sums[:, 0] / counts[:, 0] > sums[:, 1] / counts[:, 1]).float()
    else:
        desirable, kl_pi, kl_ref = batch["desirable"], values[:, 1].detach(), ref_values[:, 1]
        if shard_real is not None:  # z0 = mean(kl_pi - kl_ref) over the global micro-batch
            kl_pi, kl_ref = global_mean(kl_pi - kl_ref, shard_real), kl_ref.new_zeros(1)
        loss, m = spec.fn(values[:, 0], ref_values[:, 0], kl_pi, kl_ref, desirable, **kwargs)
        m["logps/completion"] = sums[:, 0].detach()
    if ref is not None:
        real = sums[:, :2] if spec.paired else sums[:, :1]
        m["kl/implicit"] = (real - ref[:, : real.shape[1]]).detach().mean()
    if nll_weight > 0:
        rows = torch.ones(e, dtype=torch.bool, device=sums.device) if spec.paired else batch["desirable"]
        nll = chosen_nll(sums[rows, 0], counts[rows, 0]) if bool(rows.any()) else loss * 0
        loss = loss + nll_weight * nll
        m["nll"] = nll.detach()
    return loss, m


def global_mean(x: torch.Tensor, real: bool) -> torch.Tensor:
    """The mean of x (N,) over every rank's share of a global batch, as a (1,) tensor (a
    stand-in share counts nothing); a collective: every rank calls it."""
    total, count = all_reduce_sum([float(x.sum()) if real else 0.0, float(x.numel()) if real else 0.0])
    return x.new_full((1,), total / max(count, 1.0))


def metric_totals(parts: list[tuple[int, dict]]) -> dict[str, tuple[float, float]]:
    """(numerator, denominator) of each step metric: (E,) tensors pooled (NaN skipped), scalars
    weighted by their part's example count n (n = 0: a stand-in shard, counted nowhere)."""
    out = {}
    for key in parts[0][1]:
        num = den = 0.0
        for n, m in parts:
            v = m.get(key)
            if v is None or n == 0:
                continue
            v = v.detach().float()
            if v.dim() > 0:
                ok = ~torch.isnan(v)
                num, den = num + float(v[ok].sum()), den + float(ok.sum())
            elif not torch.isnan(v):
                num, den = num + n * float(v), den + n
        out[key] = (num, den)
    if "rewards/chosen" in parts[0][1]:
        real = [m for n, m in parts if n > 0]
        rc = torch.cat([m["rewards/chosen"].float() for m in real]) if real else torch.zeros(0)
        rr = torch.cat([m["rewards/rejected"].float() for m in real]) if real else torch.zeros(0)
        out["rewards/margins"] = (float((rc - rr).sum()), float(rc.numel()))
        out["rewards/accuracy"] = (float((rc > rr).sum()), float(rc.numel()))
    return out


def summarise(parts: list[tuple[int, dict]], reduce=None) -> dict[str, float]:
    """Metrics of one step from per-micro-batch metrics (`metric_totals`); `reduce` sums the
    totals over the ranks (`all_reduce_sum`) when each rank saw a share of the step."""
    totals = metric_totals(parts)
    flat = [x for pair in totals.values() for x in pair]
    flat = reduce(flat) if reduce is not None else flat
    return {
        k: (flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else float("nan")) for i, k in enumerate(totals)
    }


def shard_examples(plan: ExamplePlan, batch: dict, r: int, w: int) -> tuple[dict, bool]:
    """Rank r's share of a global micro-batch: its examples `tensor_split(example_index, w)[r]`
    re-collated (`plan.collate`), and whether it is real. An empty share comes back as the
    batch's first example with real=False (the step gives it zero weight)."""
    idx = batch["example_index"]
    mine = torch.tensor_split(idx, w)[r]
    real = mine.numel() > 0
    return plan.collate((mine if real else idx[:1]).tolist()), real


def make_step_fn(spec: PreferenceLoss, kwargs: dict, nll_weight: float, reference, plan=None):
    """step_fn for `run_loop`: forward + backward of one optimiser step's micro-batches.

    Every loss is a mean over examples, so a micro-batch weighs n / total (its share of the
    step's examples). On w ranks each takes its examples of every micro-batch (`shard_examples`,
    re-collated with `plan`), weighs n_local / total and scales by w, so DDP's gradient average
    is the one-process gradient; KTO's z0 is all-reduced (`batch_loss`), metrics too."""

    def step(model, micro, loop: LoopConfig, device, scaler=None) -> dict[str, float]:
        total, w = sum(b["example_index"].numel() for b in micro), world()
        parts, loss_sum = [], 0.0
        for i, b in enumerate(micro):
            b, real = shard_examples(plan, b, rank(), w) if w > 1 else (b, None)
            b, n = _to(b, device), b["example_index"].numel() if real is not False else 0
            with grad_sync(model, i == len(micro) - 1):
                with autocast(loop.precision, device):
                    loss, m = call(
                        model, batch_loss, b, spec, kwargs, nll_weight, reference, loop.chunk_size, real
                    )
                scaled = loss * (n / total)
                out = scaled * w if w > 1 else scaled
                (scaler.scale(out) if scaler is not None else out).backward()
            loss_sum += float(scaled.detach())
            parts.append((n, m))
        reduce = all_reduce_sum if w > 1 else None
        return {"loss": all_reduce_sum([loss_sum])[0], **summarise(parts, reduce), "examples": total}

    step.distributed = True  # type: ignore[attr-defined]
    return step


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def preference_eval(
    model, plan: ExamplePlan, spec: PreferenceLoss, kwargs: dict, reference, chunk_size: int
) -> dict:
    """Held-out pairs: loss, preference accuracy (the loss's own implicit reward ranks chosen first),
    margins, log-probs and `logps/accuracy` (chosen more likely per token than rejected).

    KTO trains on unpaired examples; its pairs are scored with its implicit reward
    beta * log(pi / pi_ref), which is DPO's, and no loss is reported.
    """
    paired = spec.paired
    eval_spec = spec if paired else get_preference_loss("sigmoid")
    eval_kwargs = kwargs if paired else {"beta": kwargs["beta"]}
    was_training = model.training
    model.eval()
    parts = []
    for b in plan.epoch(0):
        b = _to(b, next(model.parameters()).device)
        loss, m = batch_loss(model, b, eval_spec, eval_kwargs, 0.0, reference, chunk_size)
        parts.append((b["example_index"].numel(), {**m, "loss": loss} if paired else m))
    model.train(was_training)
    return summarise(parts)


def eval_problems(cfg: PreferenceRecipe) -> list:
    from posttrain.data.tasks import task_problems

    if cfg.data.eval != "tasks" or cfg.eval.task_accuracy_n <= 0:
        return []
    return task_problems(cfg.data.tasks, "test", cfg.eval.task_accuracy_n, cfg.data.seed, cfg.data.levels)


def make_evaluator(run: Run, cfg: PreferenceRecipe, spec, kwargs, plan, reference, problems, results: dict):
    """evaluate(model, step): eval/ metrics to the run log; the latest are kept in `results`."""
    from posttrain.eval.accuracy import task_accuracy

    def evaluate(model, step: int) -> None:
        metrics = {}
        if plan:
            with autocast(run.precision, run.device):  # the precision of the cached pi_ref scores
                metrics = preference_eval(model, plan, spec, kwargs, reference, cfg.train.chunk_size)
        if problems:
            report, records = task_accuracy(model, run.tokenizer, problems, cfg.eval.max_new_tokens)
            metrics.update({f"task_accuracy/{k}": v for k, v in report.to_dict().items() if k != "seconds"})
            if is_main():  # under FSDP every rank evaluates; rank 0 writes
                with open(run.dir / "eval_generations.jsonl", "a") as f:
                    f.writelines(json.dumps({"step": step, **r}) + "\n" for r in records[:20])
        run.logger.log(step, metrics, prefix="eval/")
        results[step] = metrics
        shown = {k: metrics[k] for k in ("rewards/accuracy", "task_accuracy/overall", "loss") if k in metrics}
        if is_main():
            console.print(f"eval @ step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))

    return evaluate


# ---------------------------------------------------------------- the run


def choose_reference(cfg: PreferenceRecipe, spec: PreferenceLoss, n_examples: int, steps: int) -> str | None:
    """ "adapter", "precompute" or None (reference-free loss); see the module docstring for auto."""
    if not spec.reference:
        return None
    if cfg.reference.mode != "auto":
        return cfg.reference.mode
    if cfg.peft.method not in ADAPTER_METHODS or cfg.filter.enabled:
        return "precompute"
    seen = steps * cfg.train.batch_size * cfg.train.grad_accum
    return "precompute" if n_examples <= seen else "adapter"


def report_data(run: Run, name: str, stats: dict) -> None:
    dropped = stats.pop("dropped_list")
    if not is_main():  # several processes: rank 0 reports
        return
    (run.dir / f"data_{name}.json").write_text(json.dumps(stats, indent=1))
    if dropped:
        (run.dir / f"data_{name}_dropped.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dropped))
    drops = ", ".join(f"{n} {k}" for k, n in stats["dropped"].items()) or "none"
    console.print(
        f"[bold]{name} data[/bold]: {stats['examples']} of {stats['examples_in']} examples kept "
        f"(dropped: {drops}); mean length {stats['mean_len']:.1f}, max {stats['max_len']} tokens"
    )


def reference_scores(run: Run, cfg: PreferenceRecipe, name: str, examples: list, score: bool = True):
    """An in-order plan over `examples` and, with `score`, the pi_ref log-probs of every response,
    cached in RUN_DIR/reference/NAME.pt (see `cached_scores`)."""
    seq_len = max(cfg.train.seq_len, 2 * cfg.data.max_len)
    pad, n = run.tokenizer.pad_token_id, len(examples)
    plan = ExamplePlan(
        examples, range(n), cfg.reference.batch_size, seq_len, True, cfg.data.share_prompt, pad, 0, False
    )
    if not score:
        return plan, None

    def compute():  # pi_ref in the policy's precision, so the step-0 log-ratios are exactly 0
        with autocast(run.precision, run.device):
            return score_examples(run.model, plan, cfg.train.chunk_size)

    path = run.dir / "reference" / f"{name}.pt"
    return plan, main_first(lambda: cached_scores(path, examples, compute))  # rank 0 writes the cache


def run_preference(cfg: PreferenceRecipe) -> Path:
    """Train and export; returns the path of the exported `final/` folder."""
    spec, kwargs = get_preference_loss(cfg.loss.name), cfg.loss.kwargs()
    refuse_fsdp_eval_recipe(cfg.distributed, cfg.eval.recipe)
    run = prepare_run(cfg, cfg.output_dir, cfg.seed, cfg.model, cfg.train, peft_cfg=cfg.peft)
    model, tok = run.model, run.tokenizer
    train_data = clean_data(cfg.clean, cfg.data, "train", cfg.output_dir)
    examples, stats = build_examples(train_data, tok, "train", cfg.loss.name, unpaired=not spec.paired)
    report_data(run, "train", stats)
    steps = total_steps(cfg.train, -(-len(examples) // cfg.train.batch_size))
    mode = choose_reference(cfg, spec, len(examples), steps)
    console.print(f"loss {spec.name} {kwargs}; reference: {mode or 'none (reference-free loss)'}")
    indices, reference = list(range(len(examples))), mode
    if mode == "precompute" or cfg.filter.enabled:
        _, cached = reference_scores(run, cfg, "train", examples)
        reference = cached if mode == "precompute" else mode
        if cfg.filter.enabled:
            indices = apply_filter(run.dir, examples, *cached, cfg.filter)
    d = cfg.data
    plan = ExamplePlan(
        examples,
        indices,
        cfg.train.batch_size,
        cfg.train.seq_len,
        d.packing,
        d.share_prompt,
        tok.pad_token_id,
        cfg.seed,
    )
    eval_plan, eval_ref = None, None
    if d.eval is not None:
        eval_examples, eval_stats = build_examples(d, tok, "eval", cfg.loss.name, unpaired=False)
        report_data(run, "eval", eval_stats)
        eval_plan, eval_ref = reference_scores(run, cfg, "eval", eval_examples, score=spec.reference)
    results: dict[int, dict] = {}
    problems = eval_problems(cfg)
    evaluate = None
    if eval_plan is not None or problems:
        evaluate = make_evaluator(run, cfg, spec, kwargs, eval_plan, eval_ref, problems, results)
    evaluate = with_recipe_eval(EvalHookConfig(cfg.eval.recipe, cfg.eval.recipe_overrides), run, evaluate)
    if evaluate is not None and cfg.eval.before and run.resume_from is None and is_main():
        evaluate(model, 0)  # not wrapped yet: rank 0 evaluates alone under DDP and FSDP
    step_fn = make_step_fn(spec, kwargs, cfg.loss.nll_weight, reference, plan)
    model = run_loop(
        run, model, plan, cfg.optim, cfg.train, step_fn=step_fn, evaluate=evaluate, anomaly=cfg.anomaly
    )
    if is_main():
        summary = json.dumps({str(k): v for k, v in results.items()}, indent=1)
        (run.dir / "eval_summary.json").write_text(summary)
    out = Path(cfg.output_dir) / "final"
    final = export_final(model, lambda m: export_model(m, tok, out, cfg.peft), out)  # rank 0 writes
    run.finish(final)
    return final


def preference_main(recipe_path: str | None, overrides: list[str]) -> Path:
    """CLI entry: `posttrain preference RECIPE.yaml [key=value ...]`."""
    from posttrain.config import load_recipe
    from posttrain.distributed.launch import run_command

    cfg = load_recipe(PreferenceRecipe, recipe_path, overrides)
    return run_command("preference", recipe_path, overrides, cfg, run_preference)
