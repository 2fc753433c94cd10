"""Ray rollouts for RL (``rollout.backend: ray``): rollout-worker actors behind the engine protocol,
a reward-worker pool, weight sync through the object store verified by checksums.

- **Actors.** ``rollout.ray.rollout_workers`` `RolloutWorker` actors, each holding an `HFEngine`
  (CPU; a GPU bundle per worker with ``gpus_per_worker``), placed with one placement group
  (one bundle per worker, ``PACK``). ``reward_workers`` `RewardWorker` actors each hold a copy
  of the recipe's `RewardSet` (verifiers, sandbox, reward models); 0 scores in the trainer.
- **generate.** The prompts are split into contiguous shards, one per worker; worker i samples
  with seed ``seed + 7919 i`` (worker 0 with the step's own seed, so one worker reproduces the
  in-process engine token for token); completions come back in (prompt, sample) order. The
  trainer's autocast (train.precision / rollout.autocast) is forwarded to the workers.
- **Weight sync.** `RayEngine.update_weights` turns the policy into plain HF names
  (`posttrain.rollout.weight_sync.sync_state`: PEFT prefixes stripped, LoRA merged), puts it
  in the object store once, every worker loads it and answers the SHA-256 checksum of what it
  now holds; any difference from the trainer's checksum raises `SyncMismatch` (the run stops).
  The engine syncs at start too, so a resumed or rolled-back policy is what the workers sample.
- **Failures.** A worker that dies (killed, OOM) is replaced by a new actor in its bundle, given
  the last synced weights (checksum verified again) and its shard is retried with the same seed,
  so the step's completions equal those of a run without the failure; ``ray/restarts`` counts them.

- **Asynchronous rollouts** (``rollout.max_staleness: 1``): `prefetch` starts step t+1's first
  round while step t trains; those samples come from the weights that sampled step t
  (``rollout/staleness`` 1). Staleness above 1 is not offered.

Not here (stated): NCCL broadcast for GPU workers (the object store carries the weights on GPU too).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.errors import BackendUnavailable, ConfigError
from posttrain.rollout.engine import Completion, Prompt
from posttrain.rollout.sampling import SamplingParams
from posttrain.rollout.weight_sync import checksum, hf_name, sync_state, verify

RAY_EXTRA_FIX = "pip install 'posttrain[ray]' (Ray >= 2.9), or use rollout.backend=hf"
SEED_STRIDE = 7919


@dataclass
class RayConfig:
    """The Ray cluster's share of an RL run (``rollout.ray``; used with ``rollout.backend: ray``)."""

    rollout_workers: int = 2
    """Rollout-worker actors, each holding its own copy of the policy."""
    reward_workers: int = 0
    """Reward-worker actors scoring completions in parallel (0 = score in the trainer process)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per actor in the placement group (fractions allowed)."""
    gpus_per_worker: float = 0.0
    """GPUs per rollout worker (0 = CPU workers)."""
    address: str | None = None
    """Cluster to join (``auto``, ``ray://host:10001``); null = RAY_ADDRESS, else a local cluster."""
    max_restarts: int = 3
    """Replacements of dead workers per run before the run stops."""
    placement_timeout_s: float = 120.0
    """How long to wait for the cluster to grant the workers' resources."""

    def validate(self) -> None:
        if self.rollout_workers < 1 or self.reward_workers < 0:
            raise ConfigError(
                "rollout_workers >= 1 and reward_workers >= 0",
                where="rollout.ray",
                fix="e.g. rollout_workers: 2",
            )


def import_ray() -> Any:
    """The ray module, or BackendUnavailable naming the ``[ray]`` extra."""
    try:
        import ray
    except ImportError as err:
        raise BackendUnavailable(
            f"rollout.backend=ray needs the ray package ({err})",
            where="rollout.backend=ray",
            fix=RAY_EXTRA_FIX,
        ) from None
    return ray


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) of ``n`` items over ``parts`` shards, sizes differing by <= 1 (empty dropped)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def worker_seed(seed: int | None, worker: int) -> int | None:
    """Worker ``worker``'s sampling seed for a step seeded ``seed`` (worker 0 keeps it)."""
    return None if seed is None else (seed + SEED_STRIDE * worker) % (2**62)


class RolloutWorker:
    """A Ray actor: an `HFEngine` over the policy architecture, weights from the trainer."""

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        max_batch_rows: int,
        device: str,
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoModelForCausalLM

        from posttrain.rollout.hf_engine import HFEngine

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
        model.requires_grad_(False)
        self.engine = HFEngine(model, tokenizer, max_batch_rows=max_batch_rows)

    def pid(self) -> int:
        return os.getpid()

    def load(self, state: dict[str, torch.Tensor]) -> str:
        """Load the trainer's tensors; the checksum of what this worker now holds under those names."""
        self.engine.update_weights(state)
        mine = self.engine.model.state_dict()
        return checksum({k: mine[k] for k in state})

    def generate(self, prompts: list, params: SamplingParams, autocast: str | None) -> list[Completion]:
        ctx = torch.autocast("cpu", dtype=getattr(torch, autocast)) if autocast else nullcontext()
        with ctx:
            return self.engine.generate(prompts, params)


class RewardWorker:
    """A Ray actor scoring completions with its own copy of the recipe's `RewardSet`; ``user_fns``
    are the rewards registered in the trainer process (`register_reward`), registered here too."""

    def __init__(self, rewards: Any, user_fns: dict[str, Any]):
        from posttrain.rewards.registry import register_reward

        for name, fn in user_fns.items():
            register_reward(name, replace=True)(fn)
        self.rewards = rewards

    def score(self, records: list[dict], completions: list[Completion]) -> tuple:
        return self.rewards.score(records, completions)


def _autocast_dtype() -> str | None:
    """The trainer's active CPU autocast dtype name (forwarded to the workers), or None."""
    if torch.is_autocast_enabled("cpu"):
        return str(torch.get_autocast_dtype("cpu")).removeprefix("torch.")
    return None


class RayEngine:
    """The rollout protocol (generate, update_weights) over Ray actors; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: RayConfig, max_batch_rows: int = 256):
        cfg.validate()
        ray = import_ray()
        self._ray, self.cfg, self.tokenizer = ray, cfg, tokenizer
        if not ray.is_initialized():
            address = cfg.address or os.environ.get("RAY_ADDRESS")
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._config, self._max_rows = base.config, max_batch_rows
        # the workers hold the trainer's dtype, so their checksums compare with the trainer's
        self._dtype = next(base.parameters()).dtype
        self._device = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
        self.restarts, self.syncs = 0, 0
        self._pg = self._placement_group()
        self.workers = [self._spawn(i) for i in range(cfg.rollout_workers)]
        self._reward_workers: list[Any] = []
        self._state_ref, self._expected = None, None
        self._pending: tuple | None = None  # (prompts, params, autocast, shards, futures) of a prefetch
        self.last_staleness = 0
        """1 when the last generate returned prefetched samples (one update stale), else 0."""
        self.update_weights(model)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the trainer's autocast applies; workers get it forwarded

    def _placement_group(self) -> Any:
        from ray.util.placement_group import placement_group

        cfg = self.cfg
        rollout = {
            "CPU": cfg.cpus_per_worker,
            **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {}),
        }
        bundles = [rollout] * cfg.rollout_workers + [{"CPU": cfg.cpus_per_worker}] * cfg.reward_workers
        pg = placement_group(bundles, strategy="PACK")
        try:
            self._ray.get(pg.ready(), timeout=cfg.placement_timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            raise BackendUnavailable(
                f"the Ray cluster did not grant {len(bundles)} bundles of {rollout} within "
                f"{cfg.placement_timeout_s:.0f} s (cluster: {self._ray.cluster_resources()})",
                where="rollout.ray",
                fix="fewer rollout_workers / reward_workers, smaller cpus_per_worker, or a bigger cluster",
            ) from None
        return pg

    def _strategy(self, bundle: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=bundle)

    def _spawn(self, i: int) -> Any:
        actor = self._ray.remote(RolloutWorker).options(
            num_cpus=self.cfg.cpus_per_worker,
            num_gpus=self.cfg.gpus_per_worker,
            scheduling_strategy=self._strategy(i),
        )
        return actor.remote(self._config, self.tokenizer, self._max_rows, self._device, self._dtype)

    def _replace(self, i: int, err: Exception) -> None:
        """A new actor in dead worker i's bundle, loaded with the last synced weights (verified)."""
        self.restarts += 1
        if self.restarts > self.cfg.max_restarts:
            raise BackendUnavailable(
                f"rollout worker {i} died again ({type(err).__name__}); {self.restarts - 1} restarts already",
                where="rollout.ray.max_restarts",
                fix="look at the worker's log (/tmp/ray/session_latest/logs) for the cause (memory?)",
            ) from None
        with contextlib.suppress(Exception):  # already gone
            self._ray.kill(self.workers[i])
        self.workers[i] = self._spawn(i)
        got = self._ray.get(self.workers[i].load.remote(self._state_ref))
        verify(self._expected, {f"worker {i} (restarted)": got}, self.syncs)

    def _call(self, i: int, method: str, *args: Any) -> Any:
        """``workers[i].method(*args)``, replacing the worker and retrying once per death."""
        errors = (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError)
        while True:
            try:
                return self._ray.get(getattr(self.workers[i], method).remote(*args))
            except errors as err:
                self._replace(i, err)

    def update_weights(self, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Send the policy (module: plain HF names, LoRA merged) to every worker; verify checksums."""
        if isinstance(weights, torch.nn.Module):
            state = sync_state(weights, "merged")  # the workers hold the plain architecture
        else:
            state = {hf_name(k): v.detach() for k, v in weights.items() if hf_name(k) is not None}
        self._expected = checksum(state)
        self._state_ref = self._ray.put({k: v.cpu() for k, v in state.items()})
        futures = {i: w.load.remote(self._state_ref) for i, w in enumerate(self.workers)}
        reported = {}
        for i, fut in futures.items():
            try:
                reported[f"worker {i}"] = self._ray.get(fut)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError) as err:
                self._replace(i, err)  # loads and verifies the same state
                reported[f"worker {i}"] = self._expected
        self.syncs += 1
        verify(self._expected, reported, self.syncs)

    def _launch(self, prompts: list, params: SamplingParams, autocast: str | None) -> tuple[list, list]:
        shards = shard_bounds(len(prompts), len(self.workers))
        futures = [
            self.workers[i].generate.remote(
                prompts[a:b], params.replace(seed=worker_seed(params.seed, i)), autocast
            )
            for i, (a, b) in enumerate(shards)
        ]
        return shards, futures

    def prefetch(self, prompts: Sequence[Prompt], params: SamplingParams) -> None:
        """Start generating now with the current weights; a later `generate` of the same prompts and
        params returns these samples (Ray runs each worker's calls in order, so a following
        `update_weights` waits for them and does not change the weights under them)."""
        prompts, autocast = list(prompts), _autocast_dtype()
        self._pending = (prompts, params, autocast, *self._launch(prompts, params, autocast))

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions per prompt in (prompt, sample) order, sharded over the workers
        (the prefetched ones when `prefetch` was given the same prompts and params)."""
        prompts, autocast = list(prompts), _autocast_dtype()
        pending, self._pending = self._pending, None
        if pending is not None and pending[:3] == (prompts, params, autocast):
            shards, futures = pending[3], pending[4]
            self.last_staleness = 1
        else:
            shards, futures = self._launch(prompts, params, autocast)
            self.last_staleness = 0
        out: list[Completion] = []
        for i, ((a, b), fut) in enumerate(zip(shards, futures, strict=True)):
            try:
                got = self._ray.get(fut)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError) as err:
                self._replace(i, err)
                got = self._call(
                    i, "generate", prompts[a:b], params.replace(seed=worker_seed(params.seed, i)), autocast
                )
            for c in got:
                c.prompt_index += a
            out += got
        return out

    def reward_pool(self, rewards: Any) -> Any:
        """``rewards`` itself with no reward workers, else a `RewardPool` of actors holding copies of it."""
        if self.cfg.reward_workers == 0:
            return rewards
        ref, fns = self._ray.put(rewards), user_rewards(rewards)
        first = self.cfg.rollout_workers
        self._reward_workers = [
            self._ray.remote(RewardWorker)
            .options(num_cpus=self.cfg.cpus_per_worker, scheduling_strategy=self._strategy(first + j))
            .remote(ref, fns)
            for j in range(self.cfg.reward_workers)
        ]
        return RewardPool(self._ray, self._reward_workers)

    def shutdown(self) -> None:
        """Kill the actors and free the placement group (the cluster itself stays up)."""
        from ray.util.placement_group import remove_placement_group

        for actor in [*self.workers, *self._reward_workers]:
            self._ray.kill(actor)
        remove_placement_group(self._pg)


def user_rewards(rewards: Any) -> dict[str, Any]:
    """{name: fn} of the reward terms registered outside posttrain (a user's module, a test): they
    travel to the reward workers by value, as their module may not be importable there."""
    from ray import cloudpickle

    from posttrain.rewards.registry import REWARDS

    out = {}
    for term in rewards.terms:
        fn = REWARDS.get(term.name)
        module = getattr(fn, "__module__", "posttrain") or "posttrain"
        if fn is not None and not module.startswith("posttrain"):
            if module in sys.modules and module != "__main__":
                cloudpickle.register_pickle_by_value(sys.modules[module])
            out[term.name] = fn
    return out


class RewardPool:
    """`RewardSet.score` over reward-worker actors: contiguous shards, results concatenated in order."""

    def __init__(self, ray: Any, workers: list[Any]):
        self._ray, self.workers = ray, workers

    def score(self, records: list[dict], completions: list[Completion]) -> tuple[list, list, list]:
        shards = shard_bounds(len(completions), len(self.workers))
        futures = [
            w.score.remote(records[a:b], completions[a:b])
            for w, (a, b) in zip(self.workers, shards, strict=False)
        ]
        outcome, steps, parts = [], [], []
        for o, s, p in self._ray.get(futures):
            outcome += o
            steps += s
            parts += p
        return outcome, steps, parts


def ray_engine(model: torch.nn.Module, tokenizer: Any, ro: Any) -> RayEngine:
    """The engine of ``rollout.backend: ray`` from the recipe's rollout section."""
    return RayEngine(model, tokenizer, ro.ray, max_batch_rows=ro.max_batch_rows)
