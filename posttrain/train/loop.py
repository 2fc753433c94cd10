"""The supervised training loop shared by pretraining and SFT, and run set-up.

One optimiser step = `grad_accum` micro-batches from a `BatchPlan`; the loss of
each micro-batch is weighted by the token (or sequence) totals of the whole
step, so accumulation gives exactly the gradient of the full batch. Before
each optimiser step the loss and grad norm are checked: a NaN/inf stops the
run with a checkpoint of the last good state (`TrainingAnomaly`). SIGINT / SIGTERM
finish the current step, save a checkpoint and exit 130 / 143 (`faults.StopRequest`).
"""

from __future__ import annotations

import json
import logging
import platform
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from posttrain.algos.aggregate import AggMode
from posttrain.config import dump_yaml
from posttrain.distributed import checkpoint as dist_ckpt
from posttrain.distributed import trainer as dist
from posttrain.distributed.parallel import all_reduce_sum, call, grad_sync, is_main, local_micro, world
from posttrain.errors import ConfigError, TrainingAnomaly
from posttrain.monitor.logger import RunLogger, check_finite, console, progress_bar
from posttrain.train.anomaly import AnomalyConfig, AnomalyGuard, scale_lr
from posttrain.train.checkpoint import latest_checkpoint
from posttrain.train.faults import RunInterrupted, StopRequest, maybe_kill
from posttrain.train.lm_loss import causal_lm_loss, loss_targets
from posttrain.train.optim import OptimConfig, build_optimizer, build_scheduler, clip_grads, optimizer_step
from posttrain.train.precision import Precision, autocast
from posttrain.train.precision import resolve as resolve_precision

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Which model to start from and how to place it."""

    path: str = "default"
    """A Hugging Face model folder (or hub id where a network exists); `default` = the embedded tiny model."""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16."""
    device: str = "auto"
    """auto | cpu | cuda."""


@dataclass
class LoopConfig:
    """Steps, batches, precision, logging and checkpoint cadence."""

    max_steps: int = 100
    """Optimiser steps to run (0 = run `epochs` epochs)."""
    epochs: float = 1.0
    """Used when max_steps is 0."""
    batch_size: int = 8
    """Rows (packed) or samples (padded) per micro-batch."""
    seq_len: int = 512
    """Length of a packed row."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    loss_agg: AggMode = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum."""
    precision: Precision = "auto"
    """auto (bf16 autocast where the CPU/GPU computes bf16 natively and a cached probe says it is
    faster, else fp32; see posttrain.train.precision) | fp32 | bf16 | fp16 (CUDA only).
    Master weights and optimiser state stay fp32."""
    chunk_size: int = 1024
    """Rows per chunk of the fused LM-head + cross-entropy."""
    log_every: int = 1
    """Write metrics every N steps."""
    eval_every: int = 0
    """Eval loss (and sample generations) every N steps; 0 = only at the end."""
    save_every: int = 0
    """Checkpoint every N steps; 0 = only at the end."""
    keep_last: int = 2
    """How many checkpoints to keep."""
    num_samples: int = 2
    """Greedy sample generations logged at each eval."""
    sample_max_new_tokens: int = 64
    """Length cap of the logged sample generations."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)."""
    tensorboard: bool = True
    """Also write TensorBoard events to OUTPUT_DIR/tb (used when `loggers` is unset)."""
    loggers: list[str] | None = None
    """Trackers mirroring metrics.jsonl: tensorboard, mlflow, wandb, trackio, all local/offline
    (posttrain.monitor.loggers); unset = [tensorboard] if `tensorboard` else none."""


@dataclass
class Run:
    """A run directory with its model, tokenizer, logger and resume point."""

    dir: Path
    model: Any
    tokenizer: Any
    logger: RunLogger
    resume_from: Path | None
    device: torch.device
    precision: str = "fp32"
    """The precision `train.precision` resolved to on this machine (fp32 | bf16 | fp16)."""

    def print_data_table(self, name: str, stats: dict) -> None:
        from posttrain.data.render import format_summary_table

        if not is_main():  # several processes: rank 0 reports
            return
        console.print(f"[bold]{name} data[/bold]\n{format_summary_table(stats)}")
        (self.dir / f"data_{name}.json").write_text(json.dumps(stats, indent=1, default=str))

    def finish(self, final: Path) -> None:
        self.logger.close()
        if is_main():
            console.print(f"[green]done[/green]: model saved to {final}")


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix] if old != new else []
    return [k for key in sorted(set(old) | set(new))
            for k in changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)]  # fmt: skip


SAME_RUN_KEYS = tuple(f"distributed.{k}" for k in ("nproc", "strategy", "backend", "timeout_minutes"))


def resolve_model_path(path: str) -> str:
    if path == "default":
        from posttrain.train.pretrain import ensure_default_model

        return str(ensure_default_model())
    return path


def prepare_run(
    recipe: Any,
    output_dir: str,
    seed: int,
    model_cfg: ModelConfig | None,
    loop: LoopConfig,
    model=None,
    tokenizer=None,
    peft_cfg=None,
) -> Run:
    """Create the run dir, write config.yaml, seed, load (or take) model + tokenizer, find a checkpoint.

    With `peft_cfg` the model comes back wrapped for training (LoRA, QLoRA's 4-bit base, BitFit, ...).
    """
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.models.peft import check_qlora_backend, load_peft_model
    from posttrain.monitor.loggers import check_loggers

    loggers = getattr(loop, "loggers", None)
    check_loggers(loggers or [])  # a missing tracker fails before any model is loaded
    if loop.threads > 0:
        torch.set_num_threads(loop.threads)
    path = resolve_model_path(model_cfg.path) if model is None else "<built in memory>"  # the default
    # model builds (once, under a lock) before any process group: that build is a one-process run
    cuda = torch.cuda.is_available() and getattr(model_cfg, "device", "auto") != "cpu"
    dist.join(recipe, "cuda" if cuda else "cpu")  # under torchrun: the process group; rank 0 writes
    main = is_main()
    run_dir = Path(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = latest_checkpoint(run_dir) if getattr(recipe, "resume", True) else None
    config_text = dump_yaml(recipe)
    previous, changed = run_dir / "config.yaml", []
    if main and resume_from is not None and previous.is_file() and previous.read_text() != config_text:
        changed = changed_keys(yaml.safe_load(previous.read_text()), yaml.safe_load(config_text))
        # a moved run folder, or a new world size / strategy (same global batch), is the same run
        changed = [k for k in changed if k != "output_dir" and k not in SAME_RUN_KEYS]
    if changed:
        console.print(
            f"[yellow]warning[/yellow]: resuming {run_dir} with changed settings ({', '.join(changed)}); "
            "the result will not equal an uninterrupted run (old config kept as config.previous.yaml)"
        )
        previous.replace(run_dir / "config.previous.yaml")
    if main:
        (run_dir / "config.yaml").write_text(config_text)
    torch.manual_seed(seed)
    if model is None:
        if peft_cfg is not None and peft_cfg.method == "qlora":
            check_qlora_backend()  # before any loading: fail fast without CUDA/bitsandbytes
        tokenizer = load_tokenizer(path)
        if peft_cfg is not None:
            model = load_peft_model(path, peft_cfg, dtype=model_cfg.dtype, device=model_cfg.device)
        else:
            model = load_model(path, dtype=model_cfg.dtype, device=model_cfg.device)
    step = None
    if resume_from is not None:
        step = json.loads((resume_from / "trainer_state.json").read_text())["step"]
        console.print(f"resuming from {resume_from}")
    settings = yaml.safe_load(config_text)
    logger = RunLogger(run_dir, loop.tensorboard, step, loggers, settings) if main else dist.NullLogger()
    if changed:  # the run records that its settings changed on resume (e.g. after an anomaly pause)
        logger.event(step, "resume_changed", keys=changed)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "model": path, "seed": seed}
    if Path(path).is_dir():  # record the sampling settings used for evaluation and for rollouts
        from posttrain.rollout.sampling import eval_defaults, rollout_defaults

        meta["sampling"] = {
            "eval": eval_defaults(path).to_metadata(),
            "rollout": rollout_defaults().to_metadata(),
        }
    device = next(model.parameters()).device
    choice = resolve_precision(getattr(loop, "precision", "auto"), device)  # config.yaml keeps the request
    meta["precision"] = choice.to_metadata()
    if main:  # several processes: rank 0 reports
        label = "[yellow]warning[/yellow]: precision" if choice.warn else "precision"
        console.print(f"{label}: [bold]{choice.precision}[/bold] ({choice.reason})")
        (run_dir / "run_meta.json").write_text(json.dumps(meta, indent=1))
    return Run(run_dir, model, tokenizer, logger, resume_from, device, choice.precision)


def total_steps(loop: LoopConfig, batches_per_epoch: int) -> int:
    if loop.max_steps > 0:
        return loop.max_steps
    steps = int(loop.epochs * batches_per_epoch / loop.grad_accum)
    if steps <= 0:
        raise ConfigError("train.max_steps=0 and train.epochs give no steps", fix="set train.max_steps > 0")
    return steps


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _step_totals(micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Loss tokens and sequences over all micro-batches of one optimiser step."""
    tokens = seqs = 0
    for b in micro:
        mask, _, seq = loss_targets(b)
        tokens += int(mask.sum())
        seqs += int(torch.unique(seq).numel())
    tokens, seqs = all_reduce_sum([tokens, seqs])  # totals over all ranks' shards (identity in one process)
    return float(max(tokens, 1)), float(max(seqs, 1))


def train_step(model, micro: list[dict], loop: LoopConfig, device, scaler=None) -> dict[str, float]:
    """Forward/backward over the micro-batches of one optimiser step (no optimiser step).

    On several ranks each takes its rows of every micro-batch (`local_micro`); the weights use
    the all-reduced totals and the loss is scaled by the world size, so DDP's gradient average
    is the one-process gradient of the whole step."""
    micro, scale = local_micro(micro), world()
    num_tokens, num_seqs = _step_totals(micro)
    nll_sum = 0.0
    loss_total = torch.zeros((), device=device)
    for i, b in enumerate(micro):
        b = _to(b, device)
        with grad_sync(model, i == len(micro) - 1):
            with autocast(loop.precision, device):
                loss, m = call(
                    model, causal_lm_loss, b, loop.loss_agg,
                    num_tokens=num_tokens, num_seqs=num_seqs, chunk_size=loop.chunk_size,
                )  # fmt: skip
            scaled = loss * scale if scale > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_total += loss.detach()
        nll_sum += float(m["nll_sum"])
    loss_sum, nll_sum = all_reduce_sum([float(loss_total), nll_sum])
    return {"loss": loss_sum, "nll_token_mean": nll_sum / num_tokens, "tokens": num_tokens}


train_step.distributed = True  # type: ignore[attr-defined]


@torch.no_grad()
def eval_loss(model, plan, loop: LoopConfig, device) -> float:
    model.eval()
    nll = tokens = 0.0
    for b in plan.epoch(0):
        b = _to(b, device)
        _, m = causal_lm_loss(model, b, "token-mean", chunk_size=loop.chunk_size)
        nll += float(m["nll_sum"])
        tokens += m["tokens"]
    model.train()
    return nll / max(tokens, 1)


@torch.no_grad()
def sample_generations(model, tokenizer, samples, max_new_tokens: int, device) -> list[dict[str, str]]:
    """Greedy continuations of the prompts of a few eval samples (prompt = tokens before the first label)."""
    model.eval()
    out = []
    for s in samples:
        first = next((i for i, lab in enumerate(s.labels) if lab != -100), len(s.labels))
        ids = torch.tensor([s.input_ids[:first]], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.append({"prompt": tokenizer.decode(ids[0]), "completion": tokenizer.decode(gen[0, first:])})
    model.train()
    return out


StepFn = Callable[..., dict[str, float]]
EvalFn = Callable[[Any, int], None]


def run_loop(
    run: Run,
    model,
    plan,
    optim_cfg: OptimConfig,
    loop: LoopConfig,
    *,
    step_fn: StepFn | None = None,
    evaluate: EvalFn | None = None,
    anomaly: AnomalyConfig | None = None,
):
    """Train `model` over `plan` for the configured steps; checkpoints, logs, returns the model.

    plan: has `epoch(e) -> list[batch]` (deterministic in e) and `len()`.
    step_fn(model, micro_batches, loop, device, scaler) -> metrics with "loss": forward and
        backward of one optimiser step (default: masked causal-LM NLL, `train_step`); trainers
        with other losses (preference, reward model) pass theirs.
    evaluate(model, step): called every `loop.eval_every` steps and at the end.
    anomaly: the detectors run after each step and their action (`_check_anomaly`); None = off.
    """
    step_fn = step_fn or train_step
    loop = replace(loop, precision=run.precision)  # the step functions see the resolved precision
    device = run.device
    model = dist.setup(model, step_fn, device)  # DDP / FSDP from outside the model, when world > 1
    steps = total_steps(loop, len(plan))
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, steps)
    scaler = torch.amp.GradScaler(device.type) if loop.precision == "fp16" else None
    guard = AnomalyGuard(anomaly, run.logger) if anomaly is not None else None
    step, state = _resume(run, model, optimizer, scheduler, guard)
    model.train()

    def ckpt(at: int) -> Path:  # reads `state` (the data position) when called
        return dist_ckpt.save(
            run.dir, at, model, optimizer, scheduler, _trainer_state(state, guard), loop.keep_last
        )

    with progress_bar(steps, "train", disable=not is_main()) as bar, StopRequest() as stop:
        task = bar.add_task("train", total=steps, completed=step, stats="")
        while step < steps:
            t0 = time.perf_counter()
            dist.check_in(step)  # a dead or stuck rank ends the job here, named, after the timeout
            micro, state = _next_micro(plan, state, loop.grad_accum)
            metrics = step_fn(model, micro, loop, device, scaler)
            if scaler is not None:
                scaler.unscale_(optimizer)
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["grad_norm"] = clip_grads(model, optim_cfg.max_grad_norm)
            try:
                check_finite(metrics["loss"], "loss", step + 1)
                if scaler is None:  # with fp16 the scaler skips inf steps itself
                    check_finite(metrics["grad_norm"], "grad norm", step + 1)
            except TrainingAnomaly as exc:
                optimizer.zero_grad(set_to_none=True)
                exc.message += f"; the last good state is checkpoint {ckpt(step)}"
                raise
            optimizer_step(optimizer, scheduler, scaler)
            step += 1
            maybe_kill("after-step", step)
            dt = time.perf_counter() - t0
            metrics.update(tokens_per_s=sum(int(b["input_ids"].numel()) for b in micro) / dt, step_time_s=dt)
            metrics["epoch"] = state["epoch"]
            if step % loop.log_every == 0 or step == steps:
                run.logger.log(step, metrics)
            bar.update(
                task, completed=step, stats=f"loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:.0f} tok/s"
            )
            if evaluate is not None and ((loop.eval_every and step % loop.eval_every == 0) or step == steps):
                dist.evaluate_ranks(evaluate, model, step)
            back = guard and _check_anomaly(guard, run, step, metrics, ckpt, model, optimizer, scheduler)
            if back:  # rolled back to a checkpoint (at a lower lr): go on from there
                step, state = back["step"], {"epoch": back["epoch"], "index": back["index"]}
                continue
            stopping = dist.stop_agreed(stop.signum)  # every rank stops after the same step
            if (loop.save_every and step % loop.save_every == 0) or step == steps or stopping:
                saved = ckpt(step)
            if stopping and step < steps:  # SIGINT / SIGTERM: saved above, now stop
                run.logger.close()
                raise RunInterrupted(stop.signum or signal.SIGTERM, step, str(saved))
    return model


def _resume(run: Run, model, optimizer, scheduler, guard: AnomalyGuard | None) -> tuple[int, dict]:
    """Step and data position to start from: the resumed checkpoint's (weights, optimiser,
    scheduler and detector history loaded), else 0 and the first batch."""
    if run.resume_from is None:
        return 0, {"epoch": 0, "index": 0}
    state = dist_ckpt.load(run.resume_from, model, optimizer, scheduler)
    if guard is not None:
        guard.load_state_dict(state.get("anomaly"))
    return state["step"], {"epoch": state["epoch"], "index": state["index"]}


def _next_micro(plan, state: dict, grad_accum: int) -> tuple[list, dict]:
    """The next `grad_accum` micro-batches from the data position `state` (epoch, index), and
    the position after them."""
    micro = []
    while len(micro) < grad_accum:
        batches = plan.epoch(state["epoch"])
        if state["index"] >= len(batches):
            state = {"epoch": state["epoch"] + 1, "index": 0}
            continue
        micro.append(batches[state["index"]])
        state = {"epoch": state["epoch"], "index": state["index"] + 1}
    return micro, state


def _trainer_state(state: dict, guard: AnomalyGuard | None) -> dict:
    """What a checkpoint keeps beside the weights: the data position and the detector history."""
    position = {"epoch": state["epoch"], "index": state["index"]}
    return position if guard is None else {**position, "anomaly": guard.state_dict()}


def _check_anomaly(
    guard: AnomalyGuard, run: Run, step: int, metrics: dict, ckpt, model, optimizer, scheduler
):
    """The anomaly checks after a step and ``on_anomaly`` (`AnomalyGuard.check`): pause raises
    `RunPaused` (exit 75) after ``ckpt(step)``; rollback restores the newest checkpoint at a lower
    lr and returns its trainer state; warn (or nothing found) returns None."""
    back: dict = {}

    def rollback(factor: float) -> int | None:
        path = latest_checkpoint(run.dir)
        if path is None:
            return None
        back.update(dist_ckpt.load(path, model, optimizer, scheduler))
        guard.restore_history(back)
        scale_lr(optimizer, scheduler, factor)
        run.logger.rewind(back["step"])
        return back["step"]

    guard.check(step, metrics, lambda: ckpt(step), rollback)
    return back or None


def sft_evaluator(run: Run, eval_plan, sample_prompts, loop: LoopConfig) -> EvalFn:
    """Eval loss on `eval_plan` plus a few greedy sample generations (to samples.jsonl)."""
    return lambda model, step: _evaluate(run, model, eval_plan, sample_prompts, loop, step)


def _evaluate(run: Run, model, eval_plan, sample_prompts, loop: LoopConfig, step: int) -> None:
    metrics = {"loss": eval_loss(model, eval_plan, loop, run.device)}
    run.logger.log(step, metrics, prefix="eval/")
    if sample_prompts:
        gens = sample_generations(
            model, run.tokenizer, sample_prompts, loop.sample_max_new_tokens, run.device
        )
        main = is_main()  # under FSDP every rank generates; rank 0 writes
        with open(run.dir / "samples.jsonl", "a") if main else nullcontext() as f:
            for g in gens if main else []:
                f.write(json.dumps({"step": step, **g}) + "\n")
