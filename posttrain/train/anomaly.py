"""Anomaly detectors for training runs: each reads the metrics a step logs and says whether the
run has gone wrong, with the recent values, the threshold and the settings that would change it.

`AnomalyMonitor.update(step, metrics)` returns the anomalies found at that step. Detectors
(every threshold has a default; 0 turns it off):

- ``grad_spike``: ``grad_norm`` > k x the median of the previous ``window`` steps (at least 5;
  RL steps without a policy gradient, every group's rewards equal, are not counted);
- ``kl``: ``kl/token_mean`` above ``kl_max``, or grown by more than ``kl_rate`` per step over the
  window;
- ``entropy``: ``pg/entropy`` below ``entropy_min`` (collapse) or above ``entropy_max`` (explosion);
- ``length``: ``response/length_mean`` grown by more than ``length_growth`` (a fraction) from the
  start to the end of the window, or ``response/clipped_ratio`` jumping above ``clipped_max`` from
  a window mean below it (a run that clipped from its first step is not a change);
- ``reward_hacking``: at a held-out evaluation, against any earlier one, the training reward
  (``reward/total_mean``, mean over the steps since the evaluation before each) rose by more than
  ``hack_rise`` while the held-out metric (``eval/<heldout>``) fell by more than ``hack_drop``; or a shaping term (``reward/<t>_mean`` for t
  in ``shaping_terms``) rose over the window while every task term fell;
- ``no_signal``: every group had equal rewards (``rollout/zero_variance_frac`` = 1) for
  ``no_signal_steps`` steps in a row, so nothing updated; ``weak_signal`` (warn only, at most once
  per window): the window's mean share of such groups is ``weak_signal`` or more;
- ``loss_divergence`` (SFT, preference and every trainer logging ``loss``): the median loss of
  the last 5 steps (fewer at the start, never fewer than 3) above ``loss_divergence`` x the best
  median of ``window`` steps so far, and above the first step's loss and every loss of the window
  before the last 3: a new level, not a few hard batches (a far-too-high lr: caught within 2-3 steps
  of the blow-up; one early spike that the next steps take back does not pause; neither do the
  swings of a PRM's length-bucketed batches, measured 0.003 to 1.9 in healthy runs); or one loss
  above ``loss_spike`` x the larger of the first loss and the median of the window before: a step the
  weights may not recover from even when the next losses look normal (a reward model at lr 3,
  measured: 0.91, 157, then 0.693 = ln 2 at every step, its scores grown to ~5,000 and equal).

The monitor's history is checkpointed with the run (`state_dict` / `load_state_dict`), so a run
resumed after an interruption judges its window as the uninterrupted one would; a run resumed
after a pause starts the detectors afresh from the paused step (its settings were changed, and the
window that paused it would pause it again at once).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.errors import ConfigError, PosttrainError

OnAnomaly = Literal["pause", "warn", "rollback"]
PAUSED_EXIT = 75
"""Exit status of a run paused by an anomaly (EX_TEMPFAIL: fix the setting named, rerun to resume)."""


@dataclass
class AnomalyConfig:
    """What counts as a run gone wrong, and what to do then. Any threshold 0 = that check off."""

    on_anomaly: OnAnomaly = "pause"
    """pause: save a checkpoint, explain, exit with status 75 (rerun resumes) | warn: go on with a
    warning | rollback: reload the last good checkpoint, scale the lr by ``rollback_lr_factor``, go on."""
    window: int = 10
    """Steps the rate, growth and median checks look back over."""
    grad_spike: float = 20.0
    """grad_norm above this many times its running median."""
    kl_max: float = 1.0
    """Per-token KL to the reference above this."""
    kl_rate: float = 0.0
    """Per-token KL growing faster than this per step over the window."""
    entropy_min: float = 0.0
    """Mean token entropy below this (collapse)."""
    entropy_max: float = 0.0
    """Mean token entropy above this (explosion)."""
    length_growth: float = 1.0
    """Mean response length grown by more than this fraction over the window (1.0 = doubled)."""
    clipped_max: float = 0.5
    """Share of responses cut at the token limit jumping above this (from a window mean below it)."""
    heldout: str = "task_accuracy/overall"
    """The held-out metric (logged as ``eval/<heldout>``) the reward-hacking check watches: the RL
    trainer's task-suite accuracy, or a metric of an eval recipe (``<decoding>/<metric>``)."""
    hack_rise: float = 0.05
    """Training-reward rise between two evaluations that, with a held-out fall, is hacking."""
    hack_drop: float = 0.1
    """Held-out fall (absolute) between two evaluations that, with a reward rise, is hacking (above
    the noise of a 100-problem accuracy, about 0.05)."""
    shaping_terms: list[str] = field(default_factory=list)
    """Reward terms that shape rather than solve (e.g. [format]): rising while every other term
    falls over the window is hacking."""
    no_signal_steps: int = 5
    """Steps in a row where every group had equal rewards."""
    weak_signal: float = 0.9
    """Warn (never pause) when, over the window, this share of groups or more had equal rewards on
    average: most samples teach nothing. Said at most once per window."""
    loss_divergence: float = 3.0
    """Median loss of the last 5 steps above this many times the best window median so far (and
    above the first step's loss and every loss of the window before: a new level)."""
    loss_spike: float = 50.0
    """One loss above this many times the larger of the first loss and the median of the window
    before it (a blow-up that later losses hide). Healthy runs swung to at most ~5x either."""
    rollback_lr_factor: float = 0.5
    """rollback: the lr is multiplied by this after each rollback."""
    max_rollbacks: int = 2
    """rollback: after this many, the next anomaly pauses."""

    def validate(self) -> None:
        if self.on_anomaly not in ("pause", "warn", "rollback"):
            raise ConfigError(f"on_anomaly={self.on_anomaly!r}", where="anomaly.on_anomaly",
                              fix="use pause, warn or rollback")  # fmt: skip
        if self.window < 2:
            raise ConfigError("the anomaly window must be >= 2 steps", where="anomaly.window")
        if self.entropy_max and self.entropy_min >= self.entropy_max:
            raise ConfigError(f"entropy band {self.entropy_min}..{self.entropy_max} is empty",
                              where="anomaly.entropy_min", fix="set entropy_min < entropy_max (or 0 = off)")  # fmt: skip
        if not 0 < self.rollback_lr_factor < 1:
            raise ConfigError("rollback_lr_factor must be in (0, 1)", where="anomaly.rollback_lr_factor")


@dataclass
class Anomaly:
    """One detection: which check, on which metric, its recent values and the threshold crossed."""

    kind: str
    metric: str
    step: int
    recent: list[float]
    threshold: float
    message: str
    settings: list[str]
    """The recipe keys that would change the outcome (the panel names them)."""
    warn_only: bool = False
    """Worth saying, never worth stopping for (weak_signal): warned whatever ``on_anomaly`` says."""

    def event(self) -> dict[str, Any]:
        """The ``anomaly`` record written to metrics.jsonl (the HTML report marks it)."""
        return {"step": self.step, "event": "anomaly", "kind": self.kind, "metric": self.metric,
                "recent": self.recent, "threshold": self.threshold, "message": self.message}  # fmt: skip


class RunPaused(PosttrainError):
    """An anomaly paused the run after a checkpoint; exits with `PAUSED_EXIT` (75)."""

    def __init__(self, anomaly: Anomaly, checkpoint: str):
        recent = ", ".join(f"{v:.4g}" for v in anomaly.recent[-6:])
        super().__init__(
            f"paused at step {anomaly.step}: {anomaly.message}\n  {anomaly.metric}, recent: [{recent}]; "
            f"threshold {anomaly.threshold:.4g}\n  checkpoint: {checkpoint}",
            fix=f"change {' or '.join(anomaly.settings)} (as key=value) and rerun the same command to resume",
        )
        self.exit_code = PAUSED_EXIT
        self.anomaly = anomaly


def _rising(values: list[float]) -> float:
    """Mean of the window's second half minus mean of its first half."""
    half = len(values) // 2
    return statistics.fmean(values[half:]) - statistics.fmean(values[:half])


LOSS_SMOOTH = 5
"""Steps whose median the loss-divergence check compares (fewer when ``window`` is smaller)."""
LOSS_MIN_STEPS = 3
"""Steps before the loss-divergence check judges at all."""


class AnomalyMonitor:
    """Keeps the recent history of the watched metrics and runs every enabled check on each step."""

    WATCHED = ("grad_norm", "kl/token_mean", "pg/entropy", "response/length_mean",
               "response/clipped_ratio", "reward/total_mean", "rollout/zero_variance_frac", "loss")  # fmt: skip

    def __init__(self, cfg: AnomalyConfig):
        cfg.validate()
        self.cfg = cfg
        self.history: dict[str, deque] = {}
        self.evals: list[tuple[int, float, float]] = []  # (step, held-out metric, mean training reward)
        self.rewards_since_eval: list[float] = []
        self.no_signal_run = 0
        self.weak_said = -(10**9)
        self.best_loss = float("inf")
        self.first_loss: float | None = None

    def _push(self, key: str, value: float) -> list[float]:
        h = self.history.setdefault(key, deque(maxlen=self.cfg.window + 1))
        h.append(float(value))
        return list(h)

    def update(self, step: int, metrics: dict[str, float]) -> list[Anomaly]:
        """Record this step's metrics; return the anomalies they show (empty when all is well)."""
        before = {k: list(v) for k, v in self.history.items()}
        # an RL step where every group had equal rewards has only the KL term's (tiny) gradient:
        # its norm is no scale for the steps with a policy gradient, so it is not recorded
        no_pg = metrics.get("rollout/zero_variance_frac", 0.0) >= 1.0
        seen = {
            k: self._push(k, metrics[k])
            for k in self.WATCHED
            if k in metrics and not (no_pg and k == "grad_norm")
        }
        for key, value in metrics.items():
            if key.startswith("reward/") and key.endswith("_mean") and key not in seen:
                seen[key] = self._push(key, value)
        found = [a for check in (self._grad, self._kl, self._entropy, self._length, self._no_signal,
                                 self._loss, self._shaping) if (a := check(step, seen, before))]  # fmt: skip
        if "reward/total_mean" in metrics:
            self.rewards_since_eval.append(float(metrics["reward/total_mean"]))
        if (a := self._hacking(step, metrics)) is not None:
            found.append(a)
        return found

    def _grad(self, step, seen, before):
        c, prev = self.cfg, before.get("grad_norm", [])[-self.cfg.window :]
        if not c.grad_spike or "grad_norm" not in seen or len(prev) < 5:
            return None
        med, now = statistics.median(prev), seen["grad_norm"][-1]
        if med > 0 and now > c.grad_spike * med:  # steps with no update have a zero norm: no scale
            return Anomaly("grad_spike", "grad_norm", step, seen["grad_norm"], c.grad_spike * med,
                           f"the gradient norm {now:.3g} is {now / med:.0f}x its recent median {med:.3g}",
                           ["anomaly.grad_spike", "optim.lr", "optim.max_grad_norm"])  # fmt: skip
        return None

    def _kl(self, step, seen, before):
        c, h = self.cfg, seen.get("kl/token_mean")
        if not h:
            return None
        if c.kl_max and h[-1] > c.kl_max:
            return Anomaly("kl", "kl/token_mean", step, h, c.kl_max,
                           f"the KL to the reference ({h[-1]:.3g} per token) is above its limit",
                           ["anomaly.kl_max", "optim.lr", "algorithm.kl.coef"])  # fmt: skip
        if c.kl_rate and len(h) > c.window and (rate := (h[-1] - h[0]) / c.window) > c.kl_rate:
            return Anomaly("kl", "kl/token_mean", step, h, c.kl_rate,
                           f"the KL to the reference grows {rate:.3g} per step",
                           ["anomaly.kl_rate", "optim.lr", "algorithm.kl.coef"])  # fmt: skip
        return None

    def _entropy(self, step, seen, before):
        c, h = self.cfg, seen.get("pg/entropy")
        if not h:
            return None
        if c.entropy_min and h[-1] < c.entropy_min:
            return Anomaly("entropy", "pg/entropy", step, h, c.entropy_min,
                           f"entropy collapsed to {h[-1]:.3g}: the policy stopped exploring",
                           ["anomaly.entropy_min", "rollout.temperature", "optim.lr"])  # fmt: skip
        if c.entropy_max and h[-1] > c.entropy_max:
            return Anomaly("entropy", "pg/entropy", step, h, c.entropy_max,
                           f"entropy exploded to {h[-1]:.3g}: the policy is near-uniform",
                           ["anomaly.entropy_max", "optim.lr"])  # fmt: skip
        return None

    def _length(self, step, seen, before):
        c, prev = self.cfg, before.get("response/clipped_ratio", [])[-self.cfg.window :]
        h = seen.get("response/clipped_ratio")
        if c.clipped_max and h and prev and h[-1] > c.clipped_max and statistics.fmean(prev) <= c.clipped_max:
            return Anomaly("length", "response/clipped_ratio", step, h, c.clipped_max,
                           f"{100 * h[-1]:.0f}% of responses hit the token limit (before: {100 * statistics.fmean(prev):.0f}%)",
                           ["anomaly.clipped_max", "rollout.max_new_tokens", "optim.lr"])  # fmt: skip
        h = seen.get("response/length_mean")
        if c.length_growth and h and len(h) > c.window and h[0] > 0 and h[-1] / h[0] - 1 > c.length_growth:
            return Anomaly("length", "response/length_mean", step, h, h[0] * (1 + c.length_growth),
                           f"mean response length grew {h[0]:.0f} -> {h[-1]:.0f} tokens in {c.window} steps",
                           ["anomaly.length_growth", "rewards (a length-paying term?)", "optim.lr"])  # fmt: skip
        return None

    def _no_signal(self, step, seen, before):
        c, h = self.cfg, seen.get("rollout/zero_variance_frac")
        if not h:
            return None
        self.no_signal_run = self.no_signal_run + 1 if h[-1] >= 1.0 else 0
        reward = seen.get("reward/total_mean", [0.0])[-1]
        why = ("the policy never succeeds: start from an SFT model (cold start) or ease the task"
               if reward <= 0.5 else "the policy always succeeds: use harder prompts")  # fmt: skip
        if not c.no_signal_steps or self.no_signal_run < c.no_signal_steps:
            return self._weak_signal(step, h, why)
        return Anomaly("no_signal", "rollout/zero_variance_frac", step, h, 1.0,
                       f"every group had equal rewards for {self.no_signal_run} steps, so nothing updated; {why}",
                       ["model.path", "data.levels", "rollout.n"])  # fmt: skip

    def _weak_signal(self, step: int, h: list[float], why: str) -> Anomaly | None:
        c = self.cfg
        if not c.weak_signal or len(h) <= c.window or step - self.weak_said < c.window:
            return None
        share = statistics.fmean(h[1:])
        if share < c.weak_signal:
            return None
        self.weak_said = step
        return Anomaly("weak_signal", "rollout/zero_variance_frac", step, h, c.weak_signal,
                       f"{100 * share:.0f}% of groups had equal rewards over the last {c.window} steps, so "
                       f"most samples teach nothing; {why}", ["model.path", "data.levels", "rollout.n"],
                       warn_only=True)  # fmt: skip

    def _loss(self, step, seen, before):
        c, h = self.cfg, seen.get("loss")
        if not c.loss_divergence or not h:
            return None
        if self.first_loss is None:
            self.first_loss = h[-1]
        prev = before.get("loss", [])[-c.window :]
        base = (
            max(self.first_loss, statistics.median(prev)) if prev else 0.0
        )  # a lucky first batch is no base
        if c.loss_spike and base > 0 and h[-1] > c.loss_spike * base:
            return Anomaly("loss_divergence", "loss", step, h, c.loss_spike * base,
                           f"the loss jumped to {h[-1]:.3g}, {h[-1] / base:.0f}x the larger of the run's first "
                           f"loss and the window's median ({base:.3g}): the weights may be broken even if the "
                           "next losses look normal", ["anomaly.loss_spike", "optim.lr", "optim.max_grad_norm"])  # fmt: skip
        last = list(h)[-min(LOSS_SMOOTH, c.window) :]
        recent = statistics.median(last)
        # the baseline is the best window median, not the best 3-step mean: batches that differ by
        # design (length buckets of a PRM's chains: 0.003 to 1.0 in one healthy run) give lucky
        # 3-step means near 0, and three hard batches in a row are no divergence
        self.best_loss = min(self.best_loss, statistics.median(list(h)[-c.window :]))
        # also a new high, above the start and every loss of the window before the last 3: a loss
        # near 0 that triples on noise, or a run whose batches swing (0.03 <-> 1.9), has not
        # diverged; a median of at least 3 steps: one spike the next steps take back is no divergence
        high = max([self.first_loss, *list(h)[:-LOSS_MIN_STEPS]])
        if len(h) >= LOSS_MIN_STEPS and recent > c.loss_divergence * self.best_loss and recent > high:
            return Anomaly("loss_divergence", "loss", step, h, c.loss_divergence * self.best_loss,
                           f"the loss diverged: {recent:.3g} (median of the last {len(last)} steps) vs best "
                           f"window median {self.best_loss:.3g}, above {high:.3g}, the highest loss before "
                           "(and at the start)", ["anomaly.loss_divergence", "optim.lr"])  # fmt: skip
        return None

    def _shaping(self, step, seen, before):
        c = self.cfg
        if not c.shaping_terms:
            return None
        terms = {k[len("reward/") : -len("_mean")]: v for k, v in seen.items()
                 if k.startswith("reward/") and k.endswith("_mean") and k != "reward/total_mean"}  # fmt: skip
        shaping = {t: v for t, v in terms.items() if t in c.shaping_terms and len(v) > c.window}
        task = {t: v for t, v in terms.items() if t not in c.shaping_terms and len(v) > c.window}
        if not shaping or not task:
            return None
        rise = {t: _rising(v) for t, v in shaping.items()}
        if max(rise.values()) > c.hack_rise and all(_rising(v) < -c.hack_drop for v in task.values()):
            t = max(rise, key=rise.get)
            return Anomaly("reward_hacking", f"reward/{t}_mean", step, shaping[t], c.hack_rise,
                           f"the shaping reward {t} rises while the task reward falls",
                           ["anomaly.shaping_terms", "rewards (weights)"])  # fmt: skip
        return None

    def _hacking(self, step, metrics):
        c, key = self.cfg, f"eval/{self.cfg.heldout}"
        if key not in metrics or not c.hack_rise:
            return None
        since, self.rewards_since_eval = self.rewards_since_eval, []
        self.evals.append((step, float(metrics[key]), statistics.fmean(since) if since else float("nan")))
        _, acc1, r1 = self.evals[-1]
        # against each earlier evaluation, oldest first: greedy accuracy often falls before the
        # sampled reward rises, so the two evaluations that show both need not be adjacent
        for i, (s0, acc0, r0) in enumerate(self.evals[:-1]):
            if r0 == r0:
                rise = r1 - r0
            elif i + 2 < len(self.evals):  # evaluated before any step: its reward is the next interval's
                rise = r1 - self.evals[i + 1][2]
            else:  # the interval right after a step-0 evaluation: the rise within it
                rise = _rising(since) if len(since) >= 2 else 0.0
            if rise > c.hack_rise and acc0 - acc1 > c.hack_drop:
                return Anomaly("reward_hacking", key, step, [e[1] for e in self.evals], acc0 - c.hack_drop,
                               f"the training reward rose by {rise:.3g} since step {s0} while {key} fell "
                               f"{acc0:.3g} -> {acc1:.3g}", ["anomaly.hack_drop", "rewards", "train.eval_every"])  # fmt: skip
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "evals": self.evals,
                "rewards_since_eval": self.rewards_since_eval, "no_signal_run": self.no_signal_run,
                "weak_said": self.weak_said, "best_loss": self.best_loss,
                "first_loss": self.first_loss}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: deque(v, maxlen=self.cfg.window + 1) for k, v in state["history"].items()}
        self.evals = [tuple(e) for e in state["evals"]]
        self.rewards_since_eval = list(state["rewards_since_eval"])
        self.no_signal_run = state["no_signal_run"]
        self.weak_said = state.get("weak_said", -(10**9))
        self.best_loss = state["best_loss"]
        self.first_loss = state.get("first_loss")


class AnomalyGuard:
    """Applies ``on_anomaly`` to what the monitor finds at each step (see `AnomalyConfig`).

    The trainer calls `check` after each step (and with the held-out metrics after each
    evaluation), passing ``save() -> checkpoint path`` and ``rollback(lr_factor) -> step or None``
    (restore the newest checkpoint, scale the lr; None when there is none). Each anomaly is written
    to metrics.jsonl as an ``anomaly`` event with the action taken.
    """

    def __init__(self, cfg: AnomalyConfig, logger):
        self.cfg, self.logger = cfg, logger
        self.monitor = AnomalyMonitor(cfg)
        self.rollbacks = 0
        self.paused = False

    def check(self, step: int, metrics: dict[str, float], save, rollback=None) -> int | None:
        """None to go on; the restored step after a rollback. Raises RunPaused on pause."""
        from posttrain.monitor.logger import console

        found = self.monitor.update(step, metrics)
        if warned := [a for a in found if a.warn_only]:
            for a in warned:
                console.print(f"[yellow]step {step}: {a.kind}: {a.message}[/yellow]")
            self._record(step, warned, "warn")
            found = [a for a in found if not a.warn_only]
        if not found:
            return None
        action = self.cfg.on_anomaly
        if action == "rollback" and self.rollbacks >= self.cfg.max_rollbacks:
            action = "pause"
        for a in found:
            console.print(f"[yellow]step {step}: {a.kind}: {a.message}[/yellow] ({action}; settings: "
                          f"{', '.join(a.settings)})")  # fmt: skip
        if action == "rollback":
            restored = rollback(self.cfg.rollback_lr_factor)
            if restored is not None:
                self.rollbacks += 1
                self._record(step, found, f"rollback to step {restored}, lr x{self.cfg.rollback_lr_factor}")
                return restored
            action = "pause"  # nothing to roll back to
        if action == "warn":
            self._record(step, found, "warn")
            return None
        self._record(step, found, "pause")
        self.paused = True  # saved with the checkpoint: the resume starts the detectors afresh
        path = save()
        self.logger.close()
        raise RunPaused(found[0], str(path))

    def _record(self, step: int, found: list[Anomaly], action: str) -> None:
        for a in found:
            fields = {k: v for k, v in a.event().items() if k not in ("step", "event")}
            self.logger.event(step, "anomaly", action=action, **fields)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "rollbacks": self.rollbacks, "paused": self.paused}

    def restore_history(self, trainer_state: dict[str, Any]) -> None:
        """After a rollback: the detector history saved in that checkpoint, not its rollback count."""
        if trainer_state.get("anomaly"):
            self.monitor.load_state_dict(trainer_state["anomaly"]["monitor"])

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Resume: the detector history, exactly, after an interruption; after a pause, a fresh
        history (the old window still holds the anomaly and would pause again at once, whatever
        setting was changed) but the run's first loss (the start a divergence must exceed: a lucky
        first batch after the resume is not the start), the rollback count kept."""
        if state:
            if not state.get("paused"):
                self.monitor.load_state_dict(state["monitor"])
            else:
                self.monitor.first_loss = state["monitor"].get("first_loss")
            self.rollbacks = state["rollbacks"]


def scale_lr(optimizer, scheduler, factor: float) -> None:
    """Multiply the learning rate by ``factor`` for the rest of the run (a rollback): the
    scheduler's base rates and every parameter group's current rate."""
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


ALARM_EVERY = 10
"""Steps between two printed RL warnings of the same kind (every step still logs ``alarm/<kind>``)."""


def alarms(metrics: dict[str, float], kl_limit: float, clipped_limit: float) -> dict[str, str]:
    """Kind -> what went wrong and what to do, for the step's metrics past their limits (0 = off)."""
    out = {}
    kl = metrics.get("kl/token_mean")
    if kl_limit > 0 and kl is not None and kl > kl_limit:
        out["kl"] = (
            f"KL to the reference is {kl:.3f} per token (> train.alarm_kl={kl_limit}): the policy is "
            "drifting; lower optim.lr or raise algorithm.kl.coef"
        )
    clipped = metrics.get("response/clipped_ratio")
    if clipped_limit > 0 and clipped is not None and clipped > clipped_limit:
        out["clipped"] = (
            f"{clipped:.0%} of completions hit rollout.max_new_tokens (> train.alarm_clipped="
            f"{clipped_limit}): raise max_new_tokens, or shape lengths with rollout.overlong_filter / "
            "an overlong reward term"
        )
    return out
