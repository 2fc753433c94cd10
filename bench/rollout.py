"""Rollout speed: posttrain's HF engine vs plain ``model.generate``, n samples per prompt.

    python bench/rollout.py [--model tiny|smollm2|all] [--prompts K] [--n 8] [--max-new-tokens M] [--shots S] [--threads T]

Both systems get the same model (fp32 weights, 2 threads), the same prompts (task-suite questions
rendered with the model's chat template, left-padded for ``generate``), the same sampling
(temperature 1.0, top_p 1.0, top_k off, ``max_new_tokens`` M) and n samples per prompt
(``num_return_sequences=n`` for ``generate``). ``--shots S`` puts S solved train-split problems
(chat turns) before each question: longer prompts, where the engine's n rows read the prompt's
keys/values once a step (`posttrain.rollout.shared_prefix`); the row ``pt-expanded`` is the
engine with that turned off (``share_prompts=False``), the control. ``generate`` also returns no log-probs here;
the engine computes them for every token.

Tokens counted = generated tokens up to and including the stop token (padding after a
finished sequence is not counted), for both systems. The samples differ (different random
streams), so tokens/s, not wall time, is compared. Each system runs once to warm up, then
``--repeats`` times alternating; the figure is total tokens / total time.

posttrain's engine runs ``precision="auto"`` (bf16 autocast where the CPU has native bf16);
``generate`` runs in fp32 and under bf16 autocast, and the faster of the two is the peer. The
bandwidth limit printed is rows x memory bandwidth / weight bytes (every weight read once a step).
The engine rows also print milliseconds per decode step and rows per step (`HFEngine.stats`),
which compare the two engine rows even when their samples, and so their lengths, differ.
The last line is ``ratio posttrain(auto=P)/generate_<fp32|bf16> tokens/s: X.XXx on MACHINE``.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, machine_line, model_path


def build_prompts(k: int, shots: int = 0) -> list[list[dict]]:
    """k test-split questions, each after the same ``shots`` solved train-split problems (chat
    turns): longer prompts, as RL prompts with instructions or examples are."""
    from posttrain.data.tasks import make_split

    problems = make_split("arith", "test", k, seed=0)[:k]
    examples = [m for p in make_split("arith", "train", shots, seed=0)[:shots] for m in p.messages()]
    examples = [{"role": m["role"], "content": m.get("reasoning_content", "") + "\n" + m["content"]}
                if m["role"] == "assistant" else m for m in examples]  # fmt: skip
    return [examples + p.prompt_record()["prompt"] for p in problems]


def count_generated(seqs: torch.Tensor, stop_ids: set[int]) -> int:
    """Tokens up to and including the first stop id, per row of generate's new tokens (R, L)."""
    total = 0
    for row in seqs.tolist():
        n = len(row)
        for i, tok in enumerate(row):
            if tok in stop_ids:
                n = i + 1
                break
        total += n
    return total


def run_generate(
    model, tok, encoded: list[list[int]], n: int, max_new: int, stop_ids: set[int]
) -> tuple[int, float]:
    width = max(map(len, encoded))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded])
    attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            num_return_sequences=n,
            max_new_tokens=max_new,
            pad_token_id=tok.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    return count_generated(out[:, width:], stop_ids), elapsed


def run_engine(engine, prompts, n: int, max_new: int, stats: dict[str, float]) -> tuple[int, float]:
    """Tokens and seconds of one `generate`; adds the engine's `HFEngine.stats` into ``stats``."""
    from posttrain.rollout.sampling import rollout_defaults

    params = rollout_defaults(n=n, max_new_tokens=max_new)
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for key, value in engine.stats.items():
        stats[key] = stats.get(key, 0) + value
    return sum(len(c.token_ids) for c in out), elapsed


def bench_model(name: str, args: argparse.Namespace, mach: dict) -> tuple[float, str, str]:
    """(ours / generate's faster setting, our precision, generate's faster setting)."""
    from contextlib import nullcontext

    from posttrain.rollout.engine import encode_prompt
    from posttrain.rollout.hf_engine import HFEngine

    path = model_path(name, args.tiny_path if name == "tiny" else None)
    engine = HFEngine(str(path), dtype="float32", device="cpu", precision="auto")
    model, tok = engine.model, engine.tokenizer
    expanded = HFEngine(model, tok, precision="auto", share_prompts=False)  # the control of sharing
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    prompts = build_prompts(args.prompts, args.shots)
    encoded = [encode_prompt(tok, p) for p in prompts]
    stop_ids = set(engine.eos_ids)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"== {name}: {path} ({params / 1e6:.1f}M params), {len(prompts)} prompts x n={args.n} "
        f"({args.shots} shots, {min(map(len, encoded))}-{max(map(len, encoded))} tokens), "
        f"max_new_tokens={args.max_new_tokens}"
    )
    totals = {
        "generate-fp32": [0, 0.0],
        "generate-bf16": [0, 0.0],
        "posttrain": [0, 0.0],
        "pt-expanded": [0, 0.0],
    }
    engine_stats: dict[str, dict[str, float]] = {"posttrain": {}, "pt-expanded": {}}  # measured runs
    for rep in range(args.repeats + 1):
        for system in totals:
            torch.manual_seed(rep)
            if system.startswith("generate"):
                with bf16() if system.endswith("bf16") else nullcontext():
                    toks, secs = run_generate(model, tok, encoded, args.n, args.max_new_tokens, stop_ids)
            else:
                toks, secs = run_engine(
                    engine if system == "posttrain" else expanded, prompts, args.n, args.max_new_tokens,
                    engine_stats[system] if rep > 0 else {},
                )  # fmt: skip
            label = "warm-up" if rep == 0 else f"run {rep}"
            print(f"  {system:10s} {label:8s} {toks:6d} tokens {secs:7.2f} s {toks / secs:8.1f} tok/s")
            if rep > 0:
                totals[system][0] += toks
                totals[system][1] += secs
    rates = {k: v[0] / v[1] for k, v in totals.items()}
    # Decoding reads every weight once per step: rows x bandwidth / weight bytes bounds tokens/s.
    weight_bytes = params * (2 if engine.precision == "bf16" else 4)
    limit = len(prompts) * args.n * mach["bandwidth_gbs"] * 1e9 / weight_bytes
    for system, rate in rates.items():
        st = engine_stats.get(system)
        steps = f"; decode {1e3 * st['decode_s'] / st['steps']:.1f} ms/step at {st['row_steps'] / st['steps']:.1f} rows, prefill {st['prefill_s'] / args.repeats:.2f} s/run" if st else ""  # fmt: skip
        print(f"  {system:13s} {rate:8.1f} tok/s over {args.repeats} runs{steps}")
    print(f"  bandwidth limit at {len(prompts) * args.n} rows, {engine.precision} weights read: {limit:.0f} tok/s; "
          f"posttrain at {100 * rates['posttrain'] / limit:.1f}% of it")  # fmt: skip
    peer = max(("generate-fp32", "generate-bf16"), key=rates.get)
    ratio = rates["posttrain"] / rates[peer]
    print(f"  {name}: ratio posttrain(auto={engine.precision})/{peer} tokens/s: {ratio:.2f}x")
    return ratio, engine.precision, peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2", "all"], default="all")
    parser.add_argument(
        "--tiny-path", default=None, help="a tiny model folder (default: the embedded default model)"
    )
    parser.add_argument(
        "--prompts", type=int, default=None, help="distinct prompts (default 16 tiny, 4 smollm2)"
    )
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument(
        "--shots",
        type=int,
        default=0,
        help="solved train-split problems before each question (longer prompts)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128 tiny, 64 smollm2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 is steadier on a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["tiny", "smollm2"] if args.model == "all" else [args.model]
    mach = machine()
    print(f"machine: {machine_line(mach)}", flush=True)
    for name in names:
        sub = argparse.Namespace(**vars(args))
        sub.prompts = args.prompts or (16 if name == "tiny" else 4)
        sub.max_new_tokens = args.max_new_tokens or (128 if name == "tiny" else 64)
        ratio, ours, peer = bench_model(name, sub, mach)
    print(
        f"ratio posttrain(auto={ours})/{peer.replace('-', '_')} tokens/s: {ratio:.2f}x on {machine_line(mach)}"
    )


if __name__ == "__main__":
    main()
