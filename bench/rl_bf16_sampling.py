"""bf16-autocast sampling vs fp32 sampling for RL rollouts: speed, and the log-prob mismatch it creates.

    python bench/rl_bf16_sampling.py [--model PATH|tiny] [--prompts 16] [--n 8] [--max-new-tokens 64] [--repeats 3]

The same fp32 model samples the same prompts (arith_mag level 2-3 questions, chat template) with
the HF rollout engine, once plainly and once inside ``torch.autocast(cpu, bfloat16)`` (what
``rollout.autocast: bfloat16`` does), alternating ``--repeats`` times after a warm-up; the figure
is generated tokens / time. Then the bf16-sampled tokens are re-scored by one fp32 forward (what
the trainer computes) and `posttrain.algos.rollout_correction.mismatch_metrics` compares the
two. The fp32-sampled tokens are re-scored too: their gap is the KV-cache summation order only.
The matmul peak of each dtype and the load average are printed beside the timings.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import torch
from common import THREADS, matmul_peak, model_path


def prompts(k: int) -> list[dict]:
    from posttrain.data.tasks import task_problems

    return [p.prompt_record() for p in task_problems(["arith_mag"], "train", k, 0, [2, 3])[:k]]


def rescore(model, tok, completions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampler log-probs, fp32 trainer log-probs, valid) (B, T) of the completions."""
    from posttrain.rollout.engine import Completion  # noqa: F401  (the type scored here)
    from posttrain.train.rl_data import Scored, rollout_tensors
    from posttrain.train.rl_update import score_rollout

    group = Scored(
        {}, completions, [0.0] * len(completions), [[] for _ in completions], [{}] * len(completions)
    )
    data = rollout_tensors([group], tok.pad_token_id, overlong_filter=False)
    trainer, _ = score_rollout(model, None, data, temperature=1.0, rows_per_pass=32)
    return data["old_logp"], trainer, data["valid"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from posttrain.algos.rollout_correction import mismatch_metrics
    from posttrain.models.load import load_model, load_tokenizer
    from posttrain.rollout.engine import get_engine
    from posttrain.rollout.sampling import rollout_defaults

    torch.set_num_threads(THREADS)
    path = model_path("tiny") if args.model == "tiny" else args.model
    model, tok = load_model(path).float().eval(), load_tokenizer(path)
    engine = get_engine("hf", model=model, tokenizer=tok)
    recs = prompts(args.prompts)
    params = rollout_defaults(n=args.n, max_new_tokens=args.max_new_tokens)
    modes = {"fp32": nullcontext, "bf16-autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    tokens, seconds, last = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0), {}
    for rep in range(args.repeats + 1):
        for name, ctx in modes.items():
            t0 = time.perf_counter()
            with ctx():
                out = engine.generate(recs, params.replace(seed=rep))
            if rep:  # rep 0 warms up
                seconds[name] += time.perf_counter() - t0
                tokens[name] += sum(len(c.token_ids) for c in out)
            last[name] = out
    print(f"load average {os.getloadavg()[0]:.1f}; matmul peak GFLOP/s fp32 {matmul_peak(torch.float32):.0f}, "
          f"bf16 {matmul_peak(torch.bfloat16):.0f}")  # fmt: skip
    for name in modes:
        sampler, trainer, valid = rescore(model, tok, last[name])
        m = {k.split("/")[1]: float(v) for k, v in mismatch_metrics(trainer, sampler, valid).items()}
        print(f"{name:14s} {tokens[name] / seconds[name]:8.0f} tok/s  |d| token {m['token_abs_diff_mean']:.2e}  "
              f"|d| seq {m['seq_abs_diff_mean']:.2e}  ratio max {m['ratio_max']:.3f}  "
              f"outside [0.8,1.25] {m['ratio_outside_frac']:.2%}")  # fmt: skip
    print(
        f"ratio bf16/fp32 tokens/s: {tokens['bf16-autocast'] / seconds['bf16-autocast'] / (tokens['fp32'] / seconds['fp32']):.2f}x"
    )


if __name__ == "__main__":
    main()
