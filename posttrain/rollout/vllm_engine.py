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
- ``update_weights`` loads the trainer's tensors into the in-process model
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before the engine starts, as TRL's colocate
  mode does) and resets the prefix cache so no stale KV is reused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from posttrain.errors import BackendUnavailable
from posttrain.rollout.engine import Completion, Prompt, encode_prompt
from posttrain.rollout.sampling import SamplingParams

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
        **llm_kwargs: Any,
    ):
        vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the model in this process
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()

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

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of each prompt, ordered by (prompt_index, sample_index)."""
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        inputs = [{"prompt_token_ids": ids} for ids in encoded]
        results = self.llm.generate(inputs, self._sampling(params), use_tqdm=False)
        out: list[Completion] = []
        for i, result in enumerate(results):
            for j, o in enumerate(result.outputs):
                ids = list(o.token_ids)
                logps = [step[tok].logprob for step, tok in zip(o.logprobs or [], ids, strict=False)]
                reason = "length" if o.finish_reason == "length" else "stop"
                out.append(Completion(i, j, list(encoded[i]), ids, o.text, logps, reason))
        return out

    def update_weights(self, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy the trainer's weights (a module or a state dict, HF parameter names) into vLLM's model."""
        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        worker = self.llm.llm_engine.model_executor.driver_worker
        model = getattr(worker, "worker", worker).model_runner.model
        model.load_weights(weights=((name, t.detach()) for name, t in state.items()))
        self.llm.reset_prefix_cache()
