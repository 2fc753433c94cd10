"""The vLLM rollout backend (CUDA only, the ``[gpu]`` extra): same protocol as `HFEngine`.

NOT TESTED in this repository's CI (no GPU, no vLLM there); only its "unavailable" errors
are. It targets the vLLM V1 offline ``LLM`` API (>= 0.10.2, for ``logprobs_mode``) and is
kept small so that reading it is the review:

- prompts are encoded with our tokenizer (chat template + generation prompt) and passed as
  token ids, so the prompt ids match the HF backend's;
- log-probs: vLLM runs with ``logprobs_mode="processed_logprobs"``, i.e. after temperature
  scaling, as the HF backend. Deviation: vLLM's processed values are also *after* top-k /
  top-p truncation (renormalised); with the rollout defaults (top_p 1, top_k off) both
  backends report log softmax(logits / T). Recompute with the trainer when truncating.
  vLLM samples in its own precision (bf16 by default): expect ~1e-2 differences from the
  trainer's fp32 log-probs; don't assume ratio == 1 on the first mini-batch.
- ``update_weights`` sends the trainer's tensors under plain HF names
  (`posttrain.rollout.weight_sync.sync_state`: PEFT's ``base_model.model.`` / ``.base_layer``
  stripped, adapter tensors skipped) in buckets of ``bucket_mb`` (one ``load_weights`` call per
  bucket, not per tensor), into the in-process model (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is
  set before the engine starts, as TRL's colocate mode does; ``LLM.apply_model`` where vLLM has
  it), then resets the prefix cache so no stale KV is reused. ``lora_sync``: ``merged`` sends
  W + scaling B A under the base names; ``adapter`` sends the base weights once and serves the
  adapter as a vLLM ``LoRARequest`` saved afresh (new id) after every update.
- Each sync is verified: the log-prob of a fixed probe sequence under vLLM (prompt log-probs)
  against the trainer's; a mean absolute gap above ``probe_tol`` (default 0.05 nats, bf16
  rounding is ~1e-2) raises `SyncMismatch` -- stale or mis-named weights give gaps of whole nats.
  The per-step sampler/trainer log-prob gap is logged by the trainer (``mismatch/*``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from posttrain.errors import BackendUnavailable, ConfigError
from posttrain.rollout.engine import Completion, Prompt, encode_prompt
from posttrain.rollout.sampling import SamplingParams
from posttrain.rollout.weight_sync import LoraSync, SyncMismatch, buckets, hf_name, sync_state

PROBE_IDS = list(range(3, 35))
"""Token ids of the probe sequence whose log-prob verifies each sync (ids 3..34 exist in any vocabulary)."""

GPU_EXTRA_FIX = "pip install 'posttrain[gpu]' on a machine with an NVIDIA GPU, or use rollout.backend=hf"


def import_vllm() -> Any:
    """The vllm module, or BackendUnavailable naming the ``[gpu]`` extra."""
    try:
        import vllm
    except ImportError as err:
        raise BackendUnavailable(
            f"the vllm rollout backend needs the vllm package ({err})",
            where="rollout.backend=vllm",
            fix=GPU_EXTRA_FIX,
        ) from None
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "the vllm rollout backend needs a CUDA GPU and this torch sees none",
            where="rollout.backend=vllm",
            fix=GPU_EXTRA_FIX,
        )
    return vllm


class VLLMEngine:
    """Rollouts with ``vllm.LLM`` (see the module docstring). ``model``: an HF model folder or hub id."""

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer: Any = None,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        lora_sync: LoraSync = "merged",
        max_lora_rank: int = 64,
        bucket_mb: float = 256.0,
        probe_tol: float | None = 0.05,
        **llm_kwargs: Any,
    ):
        vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the model in this process
        self._vllm = vllm
        if lora_sync == "adapter":
            llm_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
        self.llm = vllm.LLM(
            model=str(model),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        self.lora_sync, self.bucket_bytes, self.probe_tol = lora_sync, int(bucket_mb * 2**20), probe_tol
        self.lora_request: Any = None
        self._base_sent, self._syncs = False, 0
        self._adapter_dir: Any = None

    def _apply(self, fn: Any) -> Any:
        """``fn(model)`` on vLLM's model: ``LLM.apply_model`` (vLLM >= 0.9), else the driver worker's."""
        if hasattr(self.llm, "apply_model"):
            return self.llm.apply_model(fn)
        worker = self.llm.llm_engine.model_executor.driver_worker
        return fn(getattr(worker, "worker", worker).model_runner.model)

    def _reset(self) -> None:
        self.llm.reset_prefix_cache()

    def _sampling(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            include_stop_str_in_output=True,  # the stop string is kept, as in the HF backend
            seed=params.seed,
            logprobs=0,  # the sampled token's log-prob only
        )

    def probe_logprob(self) -> float:
        """Mean log-prob of `PROBE_IDS`[1:] given their prefixes, under vLLM's current weights."""
        params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        out = self.llm.generate(
            [{"prompt_token_ids": PROBE_IDS}], params, use_tqdm=False, lora_request=self.lora_request
        )[0]
        steps = out.prompt_logprobs[1:]
        return sum(step[tok].logprob for step, tok in zip(steps, PROBE_IDS[1:], strict=True)) / len(steps)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of each prompt, ordered by (prompt_index, sample_index)."""
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        inputs = [{"prompt_token_ids": ids} for ids in encoded]
        results = self.llm.generate(
            inputs, self._sampling(params), use_tqdm=False, lora_request=self.lora_request
        )
        out: list[Completion] = []
        for i, result in enumerate(results):
            for j, o in enumerate(result.outputs):
                ids = list(o.token_ids)
                logps = [step[tok].logprob for step, tok in zip(o.logprobs or [], ids, strict=False)]
                reason = "length" if o.finish_reason == "length" else "stop"
                out.append(Completion(i, j, list(encoded[i]), ids, o.text, logps, reason))
        return out

    def update_weights(self, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Send the trainer's weights (a module, PEFT-wrapped or not, or a state dict) under plain HF
        names, in buckets; with a module, verify by the probe log-prob (module docstring)."""
        module = weights if isinstance(weights, torch.nn.Module) else None
        if self.lora_sync == "adapter" and not hasattr(module, "peft_config"):
            raise ConfigError(
                "rollout.lora_sync=adapter serves a LoRA adapter, and this policy has none",
                where="rollout.lora_sync",
                fix="use peft.method=lora, or rollout.lora_sync=merged",
            )
        if module is not None:
            state = sync_state(module, self.lora_sync)
        else:
            state = {hf_name(k): v for k, v in weights.items() if hf_name(k) is not None}
        if not (self.lora_sync == "adapter" and self._base_sent):  # the frozen base goes once
            for bucket in buckets(state, self.bucket_bytes):
                self._apply(lambda model, b=bucket: model.load_weights(weights=b))
            self._base_sent = self.lora_sync == "adapter"
        if self.lora_sync == "adapter" and module is not None:
            self._load_adapter(module)
        self._reset()
        self._syncs += 1
        if module is not None and self.probe_tol is not None:
            self._verify(module)

    def _load_adapter(self, module: torch.nn.Module) -> None:
        """Save the adapter afresh and serve it under a new LoRARequest id (vLLM caches by id)."""
        import tempfile

        from vllm.lora.request import LoRARequest

        if self._adapter_dir is None:
            self._adapter_dir = tempfile.TemporaryDirectory(prefix="posttrain-lora-")
        path = os.path.join(self._adapter_dir.name, f"sync-{self._syncs}")
        module.save_pretrained(path)
        self.lora_request = LoRARequest(f"policy-{self._syncs}", self._syncs + 1, path)

    @torch.no_grad()
    def _verify(self, module: torch.nn.Module) -> None:
        device = next(module.parameters()).device
        ids = torch.tensor([PROBE_IDS], device=device)
        logits = module(input_ids=ids).logits[0, :-1].float()
        trainer = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).mean().item()
        engine = self.probe_logprob()
        if abs(engine - trainer) > self.probe_tol:
            raise SyncMismatch(
                f"after weight sync {self._syncs}, vLLM's probe log-prob is {engine:.4f} and the "
                f"trainer's {trainer:.4f} (tolerance {self.probe_tol})",
                where=f"rollout.backend=vllm (lora_sync={self.lora_sync})",
                fix="vLLM holds other weights than the trainer (stale or mis-named); report the vLLM version",
            )
