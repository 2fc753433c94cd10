"""The reference rollout backend: a transformers causal LM driven by our own decode loop.

Why not ``model.generate``: RL rollouts sample n completions of each prompt and need the
log-prob of every sampled token. The loop here

1. prefills each distinct prompt once (a left-padded batch; position ids from the
   attention-mask cumsum, so padding does not shift positions), keeping only the last
   position's logits;
2. expands the KV cache n times along the batch (prefix sharing: the prompt is encoded once
   per group, not n times, as ``num_return_sequences`` does); with the fused forward and long
   enough prompts, the n rows instead read the prompt's keys/values once a step
   (`posttrain.rollout.shared_prefix`);
3. decodes all rows together, sampling with temperature / top-k / top-p from a
   ``torch.Generator`` seeded by ``SamplingParams.seed``; the log-prob of each sampled token
   is log softmax(logits / T) (T = 1 when greedy), untruncated by top-k / top-p -- the
   policy's own probability, which `token_logprobs(..., temperature=T)` recomputes;
4. drops a row from the batch (and its KV cache) as soon as it finishes, so finished rows
   stop costing compute; the reserved cache drops rows in place, the rows behind the batch's new
   end moving into the holes (`compact_order`), so d finished rows move at most d rows, not the
   whole cache. A row finishes on eos (tokenizer and generation config), a
   ``stop_token_ids`` id, a ``stop`` string (looked for in the decoded tail of the
   completion) or ``max_new_tokens``.

CPU costs that ``generate`` pays and this loop avoids: n prefills of the same prompt, decode
steps of finished rows, re-concatenating the whole KV cache every step (here each layer's
buffers are reserved for prompt + max_new_tokens and written in place), rebuilding the
attention mask every step (`decode_mask` builds it once), per-step logits processors, and
``torch.multinomial`` (replaced by inverse-CDF sampling, same distribution).

Works with any model whose cache is a transformers ``Cache`` with ``batch_select_indices``
(all standard decoder-only attention models, PEFT-wrapped included); models with sliding
windows or other layer types keep their own cache layers.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from posttrain.errors import ModelError
from posttrain.models import cpu_kernels
from posttrain.rollout.engine import Completion, Prompt, encode_prompt
from posttrain.rollout.fused import FusedLM, Unsupported
from posttrain.rollout.kv_cache import (
    ReservedLayer,
    compact_order,
    decode_mask,
    new_cache,
    shared_cache,
    unshare,
)
from posttrain.rollout.prefix_cache import PrefixStore, fill_layers, row_kv
from posttrain.rollout.sampling import SamplingParams
from posttrain.rollout.shared_prefix import GroupCache, worth_sharing
from posttrain.train.precision import autocast
from posttrain.train.precision import resolve as resolve_precision

_STOP_WINDOW_SLACK = 8  # extra tail tokens decoded for stop strings (tokens that decode to "")


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` (R, V); returns (tokens (R,), log-probs (R,)).

    The log-prob is taken from log softmax(logits / T) before top-k / top-p filtering (the
    policy's probability of the token); greedy (T = 0) takes the argmax and T = 1. Without top-k /
    top-p, one softmax over the vocabulary serves both the draw and the log-prob (log of the drawn
    token's probability: fp32 relative rounding, ~1e-7 in log space); on CPU with the fused kernels
    that is `cpu_kernels`' ``sample_softmax``: the same uniform and two-level draw as `draw`, in one
    pass that writes no probabilities (SmolLM2's 49k vocabulary, 28 rows, 2 threads: 0.73 -> 0.35 ms).
    """
    if params.greedy:
        tok = logits.argmax(-1)
        return tok, logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    if not 0 < params.top_k < scaled.shape[-1] and params.top_p >= 1.0:
        kernels = cpu_kernels.load() if scaled.device.type == "cpu" else None
        if kernels is not None:  # the same uniforms and draw as below, in one pass: no probs written
            u = torch.rand((scaled.shape[0],), generator=generator, device=scaled.device)
            tok, logp = kernels.sample_softmax(scaled.contiguous(), u, DRAW_BLOCK)
            return tok, logp
        probs = torch.softmax(scaled, -1)
        tok = draw(probs, generator)
        return tok, probs.gather(1, tok[:, None]).squeeze(1).log()
    logp = torch.log_softmax(scaled, -1)
    filtered = scaled
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        filtered = nucleus(filtered, params.top_p)
    tok = draw(torch.softmax(filtered, -1), generator)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


NUCLEUS_CANDIDATES = 1024


def nucleus(logits: torch.Tensor, top_p: float, candidates: int = NUCLEUS_CANDIDATES) -> torch.Tensor:
    """``logits`` (R, V) with every token outside the top-p nucleus set to -inf: a token is dropped
    when the probability mass of the tokens before it (descending) already exceeds ``top_p``.
    When the ``candidates`` most likely tokens of every row hold more than ``top_p``, only they
    are sorted (the rest is dropped either way): a full sort of SmolLM2's 49k vocabulary took
    120 ms a step for 32 rows."""
    k = min(candidates, logits.shape[-1])
    values, order = torch.topk(logits, k, dim=-1)  # sorted, descending
    probs = torch.softmax(logits, -1).gather(1, order)
    if k == logits.shape[-1] or not bool((probs.sum(-1) > top_p).all()):
        values, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(values, -1)
    drop = probs.cumsum(-1) - probs > top_p  # the mass before this token already covers top_p
    drop[:, 0] = False
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(1, order, values.masked_fill(drop, float("-inf")))


DRAW_BLOCK = 256


def draw(weights: torch.Tensor, generator: torch.Generator | None, block: int = DRAW_BLOCK) -> torch.Tensor:
    """One index per row of ``weights`` (R, V), non-negative and not necessarily normalised, drawn
    with probability weight / row sum: one uniform per row, found by inverse CDF in two levels --
    the cumulative sum of ``block``-wide block sums, then the cumulative sum inside the chosen
    block only. Same distribution as ``torch.multinomial`` (up to fp32 rounding); a full-width
    cumsum took 3.5 ms a step for 32 rows of SmolLM2's 49k vocabulary on one thread. A token of
    weight 0 is never drawn."""
    rows, vocab = weights.shape
    whole = vocab // block * block
    sums = weights[:, :whole].reshape(rows, -1, block).sum(-1)
    if whole < vocab:
        sums = torch.cat([sums, weights[:, whole:].sum(-1, keepdim=True)], dim=1)
    cdf = sums.cumsum(-1)
    u = torch.rand((rows, 1), generator=generator, device=weights.device) * cdf[:, -1:]
    b = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)  # sums[b] > 0
    rest = u - torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    cols = b * block + torch.arange(block, device=weights.device)
    inside = weights.gather(1, cols.clamp(max=vocab - 1)) * (cols < vocab)
    within = inside.cumsum(-1)
    rest = torch.minimum(rest, within[:, -1:] * (1 - 2**-20))  # rounding: stay inside the block's mass
    return (b.squeeze(1) * block + torch.searchsorted(within, rest, right=True).squeeze(1)).clamp(
        max=vocab - 1
    )


def cache_kwarg(model: Any) -> str:
    """The forward keyword of the KV cache: ``cache`` where transformers renamed it (5.x; passing
    ``past_key_values`` there warns of its removal), else ``past_key_values``."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model  # PEFT wrappers forward **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


SMALL_HIDDEN = 256


def hidden_size(model: Any) -> int | None:
    """The model's ``hidden_size`` (a multimodal config's text part included); None if unknown."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "hidden_size", None) or getattr(
        getattr(cfg, "text_config", None), "hidden_size", None
    )


def is_small(model: Any) -> bool:
    """Whether ``hidden_size`` <= `SMALL_HIDDEN`: per-call costs, not arithmetic, set its decode speed."""
    hidden = hidden_size(model)
    return hidden is not None and hidden <= SMALL_HIDDEN


def decode_threads(model: Any) -> int:
    """CPU threads for decoding (0: torch's setting): 1 for `is_small` models. Their per-step
    matmuls are ~(rows x 128) @ (128 x 512): a second thread saves little, and when the cores are
    shared (more runnable threads than cores) OpenMP's barriers wait on a descheduled sibling every
    call -- measured on 2 shared cores (load average 18) with the tiny default: greedy on 800 task
    problems 6.8 s with 1 thread, 140 s with 2."""
    return 1 if is_small(model) else 0


def decode_precision(requested: str, model: Any, device: torch.device) -> tuple[str, str]:
    """(precision, reason) the engine decodes in. ``auto`` resolves as training does
    (`posttrain.train.precision`), except that `is_small` models decode in fp32 on CPU: the bf16
    kernels' per-call cost outweighs their arithmetic there. Measured with the tiny default (hidden
    128, 1 thread, Intel Xeon with AMX): a decode step of 1 / 12 / 48 / 96 rows took 1.16 / 1.43 /
    2.49 / 3.58 ms in bf16 and 0.60 / 1.04 / 2.21 / 3.51 ms in fp32. An explicit bf16 is kept."""
    choice = resolve_precision(requested, device, key="model.precision")
    if requested == "auto" and choice.precision == "bf16" and device.type == "cpu" and is_small(model):
        return "fp32", (
            f"auto: hidden_size {hidden_size(model)} <= {SMALL_HIDDEN}, fp32 decodes faster "
            f"than bf16 at this size ({choice.reason})"
        )
    return choice.precision, choice.reason


def stop_candidates(tokenizer: Any, stop: Sequence[str], vocab: int) -> torch.Tensor | None:
    """(vocab,) bool: the tokens after which a stop string can newly appear in the decoded
    completion. A stop string that appears ends inside the text the last token added, so that text
    holds its last character; a token is flagged when its own text holds the last character of some
    stop string, or is empty or a partial character (U+FFFD: bytes that join their neighbours), or
    lies past the tokenizer's vocabulary. None (check every row) when a stop string ends in a space,
    which SentencePiece drops from a token decoded alone."""
    lasts = {s[-1] for s in stop if s}
    if not lasts or any(c.isspace() and c != "\n" for c in lasts):
        return None
    known = min(vocab, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=True)
    flags = [not t or "\ufffd" in t or any(c in t for c in lasts) for t in texts]
    return torch.tensor(flags + [True] * (vocab - known), dtype=torch.bool)


_STOP_TABLES: dict[tuple, torch.Tensor | None] = {}


def shared_stop_candidates(tokenizer: Any, stop: Sequence[str], vocab: int) -> torch.Tensor | None:
    """`stop_candidates`, built once per process for a fast tokenizer of the same serialisation
    (others: every call). It decodes every token: 0.4 s for SmolLM2's 49k vocabulary, which each new
    engine paid again (search and eval recipes build one per run)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return stop_candidates(tokenizer, stop, vocab)
    content = hashlib.sha1(backend.to_str().encode()).hexdigest()  # ~20 ms for 49k tokens
    key = (content, len(tokenizer), tuple(stop), vocab)
    if key not in _STOP_TABLES:
        _STOP_TABLES[key] = stop_candidates(tokenizer, stop, vocab)
    return _STOP_TABLES[key]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])
    return sorted(int(i) for i in ids if i is not None)


class HFEngine:
    """Rollouts with a transformers model (see the module docstring for the algorithm).

    ``model``: a loaded causal LM (e.g. the trainer's policy, shared: then ``update_weights``
    is a no-op) or a model folder to load (``dtype`` / ``device`` apply then). ``tokenizer`` is
    required with a module. ``max_batch_rows`` bounds prompts x n rows decoded together.
    ``threads``: CPU threads while generating, torch's setting restored after (None: `decode_threads`,
    1 for tiny models; 0: leave torch's setting). ``precision``: fp32 (exact; the default of the
    class, so a trainer sharing its module samples in its own numbers) | bf16 (on CPU: a bf16
    copy of the weights, `_decoder`; elsewhere autocast) | auto
    (bf16 where the hardware has it natively, `posttrain.train.precision`, except fp32 for small
    models on CPU, `decode_precision`; the commands' default).
    ``fused``: on CPU, prefill and decode Llama-family models with `posttrain.rollout.fused.FusedLM`
    (fused projections, oneDNN-packed weights; ``fused_reason`` says why a model is not); False:
    always HF's forward. ``share_prompts``: with the fused forward, the n rows of a prompt read its
    keys/values once a step (`posttrain.rollout.shared_prefix`) instead of n expanded copies; None:
    where that saves enough reads to pay for itself (`shared_prefix.worth_sharing`: long prompts,
    many samples each), and back to expanded copies once too few rows of a prompt remain.
    """

    def __init__(
        self,
        model: torch.nn.Module | str | os.PathLike,
        tokenizer: Any = None,
        *,
        max_batch_rows: int = 256,
        dtype: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        precision: str = "fp32",
        prefix_cache_tokens: int = 0,
        fused: bool = True,
        share_prompts: bool | None = None,
    ):
        if isinstance(model, str | os.PathLike):
            from posttrain.models.load import load_model, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(model)
            model = load_model(model, dtype=dtype, device=device, tokenizer=tokenizer)
        if tokenizer is None:
            raise ModelError("HFEngine needs the tokenizer with a model object", where="HFEngine(tokenizer=)")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_rows = max(1, max_batch_rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.cache_kw = cache_kwarg(model)
        self.threads = threads if threads is not None else decode_threads(model)
        self.precision, self.precision_reason = decode_precision(precision, model, self.device)
        self.prefix = PrefixStore(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self._half: torch.nn.Module | None = None  # bf16 weight copy for decoding (see `_decoder`)
        self._half_stale = False
        self.fused, self.share_prompts = fused, share_prompts
        self._fused: FusedLM | None = None
        self.fused_reason: str | None = None if fused else "fused=False"
        self._stop_rows: dict[tuple[tuple[str, ...], int], torch.Tensor | None] = {}  # `stop_candidates`
        self.stats: dict[str, float] = {}
        """Of the last `generate`: prefill_s, decode_s (wall seconds), steps (decode forwards) and
        row_steps (rows decoded, summed over the steps): time per step and rows per step, which
        compare engines even when their samples (and so their lengths) differ."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def update_weights(self, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Load new weights: a no-op when ``weights`` is the engine's own module (shared with the
        trainer); otherwise a module's or a state dict's tensors are copied in. A partial state
        dict updates only its keys; a key the model does not have is a ModelError."""
        if self.prefix is not None:  # stored keys/values belong to the old weights
            self.prefix.clear()
        self._half_stale = True
        if weights is self.model:
            return
        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ModelError(
                f"{len(result.unexpected_keys)} weights do not belong to the rollout model, "
                f"e.g. {result.unexpected_keys[:3]}",
                where="update_weights",
                fix="pass the policy's state dict (merge LoRA adapters first) or the policy module itself",
            )

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of each prompt, ordered by (prompt_index, sample_index)."""
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        gen = torch.Generator(self.device)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
        gen.manual_seed(seed)
        per_chunk = max(1, self.max_batch_rows // params.n)
        was_training, threads = self.model.training, torch.get_num_threads()
        self.model.eval()
        if self.threads and self.device.type == "cpu":
            torch.set_num_threads(min(self.threads, threads))
        out: list[Completion] = []
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "row_steps": 0}
        net = self._decoder()  # a bf16 weight copy needs no autocast; the model itself may
        try:
            with autocast(self.precision if net is self.model else "fp32", self.device):
                for start in range(0, len(encoded), per_chunk):
                    out += self._generate_chunk(net, encoded[start : start + per_chunk], start, params, gen)
        finally:
            self.model.train(was_training)
            torch.set_num_threads(threads)
        return out

    def _decoder(self) -> Any:
        """What decoding runs on: a `FusedLM` snapshot (CPU, supported models; rebuilt when the
        weights changed), else the model, or for bf16 on CPU a copy of it with bf16 weights
        (buffers such as RoPE frequencies stay fp32). Under autocast every decode step would cast
        every fp32 weight again (on SmolLM2, 40% of bf16 decode time went to those copies). Both
        snapshots are refreshed after `update_weights` and, for the fused one, after any in-place
        change of a parameter (`FusedLM.stale`)."""
        if self.device.type == "cpu" and self.fused_reason is None:
            fused = self._fused_decoder()
            if fused is not None:
                return fused
        fp32 = next(self.model.parameters()).dtype == torch.float32
        if self.precision != "bf16" or self.device.type != "cpu" or not fp32:
            return self.model
        with torch.no_grad():
            if self._half is None:
                self._half = copy.deepcopy(self.model).eval()
                for p in self._half.parameters():
                    p.requires_grad_(False)
                    p.data = p.data.to(torch.bfloat16)
            elif self._half_stale:
                for h, p in zip(self._half.parameters(), self.model.parameters(), strict=True):
                    h.copy_(p)
        self._half_stale = False
        return self._half

    def _fused_decoder(self) -> FusedLM | None:
        dtype = torch.bfloat16 if self.precision == "bf16" else next(self.model.parameters()).dtype
        current = self._fused
        if current is not None and not self._half_stale and current.dtype == dtype and not current.stale():
            return current
        self._fused = None
        if not all(isinstance(layer, ReservedLayer) for layer in new_cache(self.model, 1).layers):
            self.fused_reason = "a cache layer other than full attention (sliding window...)"
            return None
        try:
            self._fused = FusedLM(self.model, dtype)
        except Unsupported as err:
            self.fused_reason = str(err)
            return None
        self._half_stale = False
        return self._fused

    def _generate_chunk(
        self, net: Any, encoded: list[list[int]], offset: int, params: SamplingParams, gen: torch.Generator
    ) -> list[Completion]:
        distinct: dict[tuple[int, ...], int] = {}
        for ids in encoded:
            distinct.setdefault(tuple(ids), len(distinct))
        row_of = [distinct[tuple(ids)] for ids in encoded for _ in range(params.n)]
        expand = torch.tensor(row_of, device=self.device)
        tokens, logps, lengths, stopped = self._decode(net, [list(k) for k in distinct], expand, params, gen)
        seqs = [tokens[r, : lengths[r]].tolist() for r in range(len(row_of))]
        texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        return [
            Completion(
                prompt_index=offset + r // params.n,
                sample_index=r % params.n,
                prompt_ids=list(encoded[r // params.n]),
                token_ids=seqs[r],
                text=texts[r],
                logprobs=logps[r, : lengths[r]].tolist(),
                finish_reason="stop" if stopped[r] else "length",
            )
            for r in range(len(row_of))
        ]

    def _prefill(
        self, net: Any, prompts: list[list[int]], steps: int
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Encode the distinct prompts once: (last-position logits (U, V), cache, attention mask
        (U, P + S + steps), ones past the prompt). With a prefix store, each prompt's longest
        stored prefix (m_i tokens) is copied into the cache and only the rest is run
        (`posttrain.rollout.prefix_cache`); without one, m_i = 0: a plain left-padded prefill."""
        u, store = len(prompts), self.prefix
        cache = new_cache(self.model, max(len(p) for p in prompts) + steps)
        if store is not None and not all(isinstance(layer, ReservedLayer) for layer in cache.layers):
            store = None  # sliding-window or other layer kinds: no reuse
        found = [store.lookup(tuple(p)) for p in prompts] if store is not None else [(0, None)] * u
        ms = [m for m, _ in found]
        width_p, width_s = max(ms), max(len(p) - m for p, m in zip(prompts, ms, strict=True))
        ids = torch.full((u, width_s), self.pad_id, dtype=torch.long)
        pos = torch.zeros((u, width_s), dtype=torch.long)
        attn = torch.zeros((u, width_p + width_s), dtype=torch.long)
        for i, (p, m) in enumerate(zip(prompts, ms, strict=True)):
            s = len(p) - m
            ids[i, width_s - s :] = torch.tensor(p[m:], dtype=torch.long)
            pos[i, width_s - s :] = torch.arange(m, len(p))
            attn[i, width_p - m : width_p] = 1
            attn[i, width_p + width_s - s :] = 1
        ids, pos, attn = ids.to(self.device), pos.to(self.device), attn.to(self.device)
        if width_p:
            cache = new_cache(self.model, width_p + width_s + steps)
            fill_layers(cache, [kv for _, kv in found], ms, width_p)
        if isinstance(net, FusedLM):
            logits = net.forward(ids, pos, None if bool(attn.all()) else attn.bool(), cache)
        else:
            out = net(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_kw: cache},
            )
            logits = out.logits[:, -1].float()
        if store is not None:  # copy out only what the store does not hold yet
            for i, p in enumerate(prompts):
                if store.accepts(tuple(p)):
                    store.add(tuple(p), row_kv(cache, i, attn[i].nonzero().squeeze(1)))
        attn = torch.cat([attn, attn.new_ones((u, steps))], dim=1)
        return logits, cache, attn  # the cache is filled in place

    @torch.inference_mode()
    def _decode(
        self,
        net: Any,
        prompts: list[list[int]],
        expand: torch.Tensor,
        params: SamplingParams,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:
        """Decode rows = distinct prompts[expand]; returns (tokens (R, L), log-probs (R, L), lengths, stopped)."""
        rows, steps, dev = expand.numel(), params.max_new_tokens, self.device
        start = time.perf_counter()
        logits, cache, attn = self._prefill(net, prompts, steps)
        prefilled = time.perf_counter()
        self.stats["prefill_s"] += prefilled - start
        fused = isinstance(net, FusedLM)
        width = attn.shape[1] - steps
        share = self.share_prompts
        if share is None:
            share = fused and worth_sharing(rows, len(prompts), width, net.kv_heads, net.head_dim)
        if fused and share and rows > len(prompts):  # attention over shared prompts
            cache = shared_cache(net, cache, attn[:, :width], expand, steps)
        else:
            cache.batch_select_indices(expand)  # prefix sharing: n rows per prompt from one prefill
        logits, attn = logits[expand], attn[expand]
        tokens = torch.full((rows, steps), self.pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros((rows, steps), device=dev)
        lengths, stopped = [steps] * rows, [False] * rows
        stop_ids = torch.tensor(self.eos_ids + list(params.stop_token_ids), dtype=torch.long, device=dev)
        active, pos = torch.arange(rows, device=dev), attn[:, :width].sum(-1)
        mask = None if isinstance(cache, GroupCache) else decode_mask(net, cache, attn)
        for t in range(steps):
            tok, lp = sample_next(logits, params, gen)
            tokens[active, t], logps[active, t] = tok, lp
            done = torch.isin(tok, stop_ids)
            if params.stop:
                done |= self._stop_strings(tokens, active, tok, t, params.stop, logits.shape[-1])
            finished = active[done].tolist()  # the step's one host sync
            for r in finished:
                lengths[r], stopped[r] = t + 1, True
            if t == steps - 1 or len(finished) == len(active):
                break
            if finished:  # drop finished rows: they stop costing compute
                keep = compact_order(~done)
                active, tok, pos = active[keep], tok[keep], pos[keep]
                mask = None if mask is None else mask[keep]
                cache.batch_select_indices(keep)
                if isinstance(cache, GroupCache) and self.share_prompts is None and not cache.pays():
                    cache = unshare(self.model, cache, width + steps)  # too few rows a prompt left
                    mask = decode_mask(net, cache, attn[active])
            self.stats["steps"] += 1
            self.stats["row_steps"] += tok.numel()
            if fused:
                logits = net.forward(tok[:, None], pos[:, None], mask, cache)
            else:
                out = net(
                    input_ids=tok[:, None],
                    attention_mask=None if mask is None else mask[..., : width + t + 1],
                    position_ids=pos[:, None],
                    use_cache=True,
                    **{self.cache_kw: cache},
                )
                logits = out.logits[:, -1].float()
            pos = pos + 1
        self.stats["decode_s"] += time.perf_counter() - prefilled
        return tokens, logps, lengths, stopped

    def _stop_strings(
        self,
        tokens: torch.Tensor,
        active: torch.Tensor,
        tok: torch.Tensor,
        t: int,
        stop: Sequence[str],
        vocab: int,
    ) -> torch.Tensor:
        """(R,) bool: the active rows whose completion now holds a stop string. Only the rows whose
        new token `stop_candidates` flags are decoded (the tokenizer's Python per row and step was
        5% of a tree search's time on the tiny default)."""
        key = (tuple(stop), vocab)
        if key not in self._stop_rows:
            flags = shared_stop_candidates(self.tokenizer, stop, vocab)
            self._stop_rows[key] = None if flags is None else flags.to(tok.device)
        flags, window = self._stop_rows[key], max(len(s) for s in stop) + _STOP_WINDOW_SLACK
        rows = (
            torch.arange(tok.numel(), device=tok.device) if flags is None else flags[tok].nonzero().squeeze(1)
        )
        hit = torch.zeros(tok.numel(), dtype=torch.bool, device=tok.device)
        if rows.numel():
            hit[rows] = self._stop_string_hit(tokens[active[rows], max(0, t + 1 - window) : t + 1], stop)
        return hit

    def _stop_string_hit(self, generated: torch.Tensor, stop: Sequence[str]) -> torch.Tensor:
        """(R,) bool: the decoded tail (R, W) of each row's completion contains a stop string."""
        tails = self.tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in text for s in stop) for text in tails], device=generated.device)
