"""lm-evaluation-harness adapter: a posttrain model folder as the lm-eval model ``posttrain``.

Behind the ``[eval]`` extra (``pip install 'posttrain[eval]'``: lm-eval); lm_eval is imported
only when the adapter is used. `lm_class` builds (once) and registers ``PosttrainLM``, a
``TemplateLM`` over our model folder (``path``: ``default``, a folder or a run's ``final/``):

- ``loglikelihood``: lm-eval splits (context, continuation) into tokens; the concatenation
  (left-truncated to ``max_length``) runs through the model in right-padded batches and the
  continuation's log-prob is sum_t log softmax(logits_{t-1})[x_t]; ``is_greedy`` is whether every
  continuation token is the argmax.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length``, summed.
- ``generate_until``: our HF rollout engine (batched, KV cache) with the request's ``until`` as
  stop strings (the text is cut at the first one), ``max_gen_toks`` and ``temperature`` (0 or
  ``do_sample: false``: greedy), decoding in ``precision`` (``auto``: bf16 where the hardware
  computes it natively, `posttrain.rollout.hf_engine.decode_precision`; or fp32 / bf16); or,
  with ``--model_args strategy=NAME``, a registered search strategy (`search_generate`: e.g.
  ``strategy=best_of_n,n=4,select=likelihood`` or
  ``strategy=best_of_n,n=8,select=orm,scorer=orm:runs/rm/final``; the strategy's own keys, and
  ``step.KEY`` for its step config, go in the same model_args). Log-likelihoods are unchanged.

``posttrain eval MODEL --harness TASKS`` runs `run_harness` (``--harness-include DIR``: custom
task YAMLs; the HF hub is switched off, so tasks must read local files); the lm-eval CLI works
as ``lm_eval --model posttrain --model_args pretrained=MODEL ...`` (lm-eval 0.4.13 has no plugin
entry point for models: the ``posttrain-lm-eval.pth`` start-up hook, `posttrain._lm_eval_hook`,
registers ``posttrain`` when lm-eval loads its models), or ``python -m posttrain.eval.harness run
...`` where that hook is not installed.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import BackendUnavailable


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise BackendUnavailable(
            "the lm-evaluation-harness adapter needs lm-eval",
            where="--harness",
            fix="pip install 'posttrain[eval]' (or pip install lm-eval torch==<your torch>)",
        ) from None
    return lm_eval


@functools.cache
def lm_class() -> type:
    """``PosttrainLM``, registered in lm-eval as ``posttrain`` (module docstring)."""
    _lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    @register_model("posttrain")
    class PosttrainLM(TemplateLM):
        def __init__(self, path: str = "default", batch_size: int | str = 8, max_length: int | None = None,
                     max_gen_toks: int = 256, dtype: str = "auto", device: str = "auto",
                     precision: str = "auto", strategy: str | None = None, scorer: str = "none",
                     **config: Any):  # fmt: skip
            super().__init__()
            self.search = search_settings(strategy, scorer, config)
            from posttrain.models.load import load_model, load_tokenizer
            from posttrain.rollout.engine import get_engine
            from posttrain.train.loop import resolve_model_path

            self.path = resolve_model_path(str(path))
            self.tokenizer = load_tokenizer(self.path)
            self.model = load_model(self.path, tokenizer=self.tokenizer, dtype=dtype, device=device).eval()
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
            cfg = self.model.config
            self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048))
            self.max_gen_toks = int(max_gen_toks)
            self.engine = get_engine("hf", model=self.model, tokenizer=self.tokenizer, precision=precision)

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> Any:
            return cls(**lm_kwargs(arg_dict, additional_config))

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        @property
        def tokenizer_name(self) -> str:
            return self.path.replace("/", "__")

        @property
        def eot_token_id(self) -> int:
            eos = self.tokenizer.eos_token_id
            return eos if eos is not None else self.tokenizer.pad_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw: Any) -> list[int]:
            return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)  # fmt: skip

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kw: Any) -> list:
            pairs = [(ctx, cont) for _, ctx, cont in requests]
            return continuation_logprobs(self.model, pairs, self.max_length, self.batch_size,
                                         self.tokenizer.pad_token_id or 0)  # fmt: skip

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            return rolling_logprobs(self, [req.args[0] for req in requests])

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            return generate_until(self, [req.args for req in requests])

    return PosttrainLM


def __getattr__(name: str) -> Any:
    """``PosttrainLM``: the placeholder ``posttrain.eval.harness:PosttrainLM`` that
    `posttrain._lm_eval_hook` registers resolves here (the class is built on first use)."""
    if name == "PosttrainLM":
        return lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lm_kwargs(arg_dict: dict, additional_config: dict | None) -> dict:
    """``--model_args`` win over the CLI's batch size / device; lm-eval's default ``cuda:0`` is
    dropped on a machine without CUDA (our ``device: auto`` picks the device); ``pretrained``
    (lm-eval's usual key) is accepted for ``path``."""
    import torch

    extra = {k: v for k, v in (additional_config or {}).items() if k in ("batch_size", "device") and v}
    if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
        extra.pop("device")
    args = dict(arg_dict)
    if "pretrained" in args:
        from posttrain.errors import ConfigError

        if "path" in args:
            raise ConfigError("model_args give both pretrained and path", where="--model_args",
                              fix="keep one of them: pretrained=MODEL")  # fmt: skip
        args["path"] = args.pop("pretrained")
    return {**extra, **args}


def rolling_logprobs(lm: Any, texts: list[str]) -> list[float]:
    """Each text's log-likelihood over lm-eval's disjoint rolling windows of ``lm.max_length``."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    out = []
    for text in texts:
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            lm.tok_encode(text), lm.prefix_token_id, lm.max_length, 1)]  # fmt: skip
        scores = continuation_logprobs(lm.model, windows, lm.max_length, lm.batch_size,
                                       lm.tokenizer.pad_token_id or 0)  # fmt: skip
        out.append(sum(s for s, _ in scores))
    return out


def generate_until(lm: Any, args: list[tuple[str, dict]]) -> list[str]:
    """Completions of ``(context, gen_kwargs)`` requests, batched per distinct gen_kwargs through the
    engine: ``until`` as stop strings (cut at the first), ``max_gen_toks``, greedy unless
    ``do_sample`` with a temperature; contexts keep their last ``max_length - max_gen_toks`` tokens."""
    from posttrain.rollout.sampling import SamplingParams

    groups: dict[str, list[int]] = {}
    for i, (_, kwargs) in enumerate(args):
        groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
    out = [""] * len(args)
    for idx in groups.values():
        kwargs = dict(args[idx[0]][1])
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temp = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample", False) else 0.0
        params = SamplingParams(temperature=temp, max_new_tokens=int(kwargs.get("max_gen_toks", lm.max_gen_toks)),
                                stop=until, seed=0)  # fmt: skip
        keep = max(lm.max_length - params.max_new_tokens, 1)
        prompts = [lm.tok_encode(args[i][0])[-keep:] for i in idx]
        if getattr(lm, "search", None) is not None:
            texts = search_generate(lm.engine, lm.search, [args[i][0] for i in idx], params.max_new_tokens)
        else:
            texts = [c.text for c in lm.engine.generate(prompts, params)]
        for i, text in zip(idx, texts, strict=True):
            out[i] = cut_at(text, until)
    return out


@dataclass
class SearchSettings:
    """A search strategy as the adapter's decoder (``--model_args strategy=NAME,...``)."""

    strategy: str
    """A registered strategy (``posttrain.search.strategy_names()``), e.g. best_of_n."""
    scorer: str
    """``none``, ``majority``, or a reward / value model (``orm:PATH``, ``prm:PATH``, ``value:PATH``)."""
    config: dict[str, Any]
    """Keys of the strategy's config class; ``step.x=v`` sets its step config; ``seed`` defaults
    to 0 (the same samples on every run)."""


def search_settings(strategy: str | None, scorer: str, extra: dict[str, Any]) -> SearchSettings | None:
    """The adapter's search settings from ``--model_args`` (None: plain decoding), checked now: a
    key that is neither the adapter's nor the strategy's, or an oracle scorer (lm-eval gives the
    model no ground truth), is a ConfigError naming ``--model_args``."""
    from posttrain.errors import ConfigError

    if strategy is None:
        if extra or scorer != "none":
            keys = sorted(extra) + (["scorer"] if scorer != "none" else [])
            raise ConfigError(f"unknown model_args {keys}", where="--model_args",
                              fix="the adapter takes pretrained/path, batch_size, max_length, max_gen_toks, dtype, "
                                  "device, and strategy=NAME with scorer and the strategy's own keys")  # fmt: skip
        return None
    from posttrain.search.compare import StrategySpec, strategy_config
    from posttrain.search.scorer_specs import parse_scorer

    config: dict[str, Any] = {"seed": 0}
    for key, value in extra.items():  # step.max_new_tokens=64 -> {"step": {"max_new_tokens": 64}}
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    strategy_config(StrategySpec(strategy, config=config), where="--model_args")
    if parse_scorer(scorer, "--model_args scorer").oracle:
        raise ConfigError(f"scorer {scorer!r} needs each problem's ground truth, which lm-eval does not pass",
                          where="--model_args scorer", fix="use majority, none, orm:PATH, prm:PATH or value:PATH")  # fmt: skip
    return SearchSettings(strategy, scorer, config)


def search_generate(
    engine: Any, search: SearchSettings, contexts: list[str], max_new_tokens: int
) -> list[str]:
    """One search per context (all batched in one `run_search` call); the request's
    ``max_gen_toks`` is the strategy's ``step.max_new_tokens`` unless model_args set it."""
    from posttrain.search.compare import StrategySpec, make_scorer, strategy_config
    from posttrain.search.protocols import Query
    from posttrain.search.registry import run_search

    cfg = strategy_config(StrategySpec(search.strategy, config=search.config), where="--model_args")
    if "max_new_tokens" not in search.config.get("step", {}):
        cfg.step.max_new_tokens = max_new_tokens
    scorer = make_scorer(search.scorer, cfg.step.step_sep)
    return [r.text for r in run_search(search.strategy, engine, [Query(c) for c in contexts], scorer, cfg)]


def cut_at(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cuts = [text.find(s) for s in until if s and s in text]
    return text[: min(cuts)] if cuts else text


def continuation_logprobs(
    model: Any, pairs: list[tuple[list[int], list[int]]], max_length: int, batch_size: int, pad_id: int
) -> list[tuple[float, bool]]:
    """Per (context ids, continuation ids): (sum of the continuation's log-probs, all greedy).
    The concatenation keeps its last ``max_length + 1`` tokens (the input is all but the last)."""
    import torch

    device = next(model.parameters()).device
    out: list[tuple[float, bool]] = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            seqs = [(ctx + cont)[-(max_length + 1) :] for ctx, cont in chunk]
            inputs = [q[:-1] for q in seqs]
            width = max(len(q) for q in inputs)
            ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(inputs), width), dtype=torch.long)
            for i, q in enumerate(inputs):
                ids[i, : len(q)] = torch.tensor(q)
                mask[i, : len(q)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for i, (q, (_, cont)) in enumerate(zip(seqs, chunk, strict=True)):
                n = len(cont)
                rows = logits[i, len(q) - 1 - n : len(q) - 1].float()
                target = torch.tensor(cont, device=device)
                logp = torch.log_softmax(rows, -1).gather(1, target[:, None]).squeeze(1)
                out.append((float(logp.sum()), bool((rows.argmax(-1) == target).all())))
    return out


def run_harness(
    model: str,
    tasks: list[str],
    output_dir: str,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
) -> Path:
    """lm-eval's ``simple_evaluate`` with the ``posttrain`` model; writes and returns
    ``output_dir/harness_results.json`` (lm-eval's results, per-task metrics with stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm_cls = lm_class()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from posttrain.errors import ConfigError
    from posttrain.eval.results import write_atomic

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval has no task {unknown[0]!r}", where="--harness",
                          fix=f"pass --harness-include DIR with its YAML; known: {', '.join(sorted(manager.all_tasks)[:20])}")  # fmt: skip
    lm = lm_cls(path=model, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, apply_chat_template=apply_chat_template, bootstrap_iters=1000)  # fmt: skip
    out = Path(output_dir) / "harness_results.json"
    keep = {
        k: res[k]
        for k in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
        if k in res
    }
    write_atomic(out, json.dumps(keep, indent=1, default=str))
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    print(f"results: {out}")
    return out


def main() -> None:
    """``python -m posttrain.eval.harness run ...``: lm-eval's own CLI with ``posttrain`` registered."""
    lm_class()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
