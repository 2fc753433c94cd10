"""Throughput of `posttrain data clean`: records/s with exact dedup, near dedup and decontamination.

    python bench/data_clean.py [--records 1000000] [--no-peer] [--keep DIR]

Writes N short synthetic prompt/completion records (30-45 words of a 20,000-word vocabulary)
to a JSONL file: 5% are exact duplicates of an earlier record up to case and spacing, 5%
one-word edits of an earlier record, 0.1% contain one of 1,000 eval questions (18-25 words).
Then `run_clean` reads, validates, filters (the structural checks), dedups (exact + MinHash
LSH, 128 permutations, threshold 0.8) and decontaminates (13-grams + exact question) them.

The peer (``--no-peer`` skips it) is datasketch alone in the simplest loop over the same
texts already in memory: MinHash of the word 3-grams (hashed by xxh32, as in run_clean),
`MinHashLSH.query` (datasketch's default bands), insert when new; no file I/O, validation,
exact dedup, decontamination or candidate check. It is the floor of what near dedup with
datasketch costs, not a competing tool doing the same job.
``--engine ray`` runs the same recipe on a local Ray cluster (``--ray-cpus`` CPUs).
``--default-corpus`` instead cleans the embedded default model's pretraining corpus (its cache's
corpus.jsonl.gz, or regenerated from the default recipe; each document as a chat record: the
question, then the rest as the reply) with exact + near dedup and decontamination against every
registered task's test split (up to ``--test-per-level`` questions per task and level), and
prints its report.
The issue's target: 1,000,000 records in under 10 minutes on 2 cores (>= 1,667 records/s).
The last line: records/s of run_clean and the CPU model (lscpu). On a shared machine the
figure is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb

from posttrain.config import from_dict
from posttrain.data.quality.clean import CleanRecipe, run_clean


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def synth(n: int, folder: Path, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """Write the records and the eval set; returns their paths and every record's text (for the peer)."""
    rng = random.Random(seed)
    vocab = [f"tok{i}" for i in range(20_000)]
    questions = [" ".join(rng.choices(vocab, k=rng.randint(18, 25))) for _ in range(1000)]
    evals = folder / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    data, texts, rows = folder / "data.jsonl", [], []
    with open(data, "w") as f:
        for _ in range(n):
            u = rng.random()
            if rows and u < 0.05:  # exact duplicate up to case and spacing
                p, c = rows[rng.randrange(len(rows))]
                p, c = p.upper(), c.replace(" ", "  ")
            elif rows and u < 0.10:  # one-word edit of the completion
                p, c = rows[rng.randrange(len(rows))]
                words = c.split()
                words[rng.randrange(len(words))] = rng.choice(vocab)
                c = " ".join(words)
            else:
                p = " ".join(rng.choices(vocab, k=rng.randint(8, 12)))
                c = " ".join(rng.choices(vocab, k=rng.randint(22, 33)))
                if u > 0.999:  # contaminated
                    c = f"{c} {rng.choice(questions)}"
                if len(rows) < 100_000:
                    rows.append((p, c))
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
            texts.append(f"{p}\n{c}")
    return data, evals, texts


def peer(texts: list[str]) -> tuple[float, int]:
    """datasketch alone: MinHash of word 3-grams, query, insert when new. Returns (records/s, dups)."""
    import xxhash
    from datasketch import MinHash, MinHashLSH

    template = MinHash(num_perm=128)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    dups = 0
    start = time.perf_counter()
    for i, text in enumerate(texts):
        w = text.lower().split()
        m = MinHash(
            num_perm=128,
            permutations=template.permutations,
            scheme=template.scheme,
            hashfunc=xxhash.xxh32_intdigest,
        )
        m.update_batch([" ".join(w[j : j + 3]).encode() for j in range(len(w) - 2)])
        if lsh.query(m):
            dups += 1
        else:
            lsh.insert(i, m, check_duplication=False)
    return len(texts) / (time.perf_counter() - start), dups


def default_corpus(folder: Path) -> Path:
    """The default model's pretraining corpus as chat records (module docstring)."""
    import gzip

    from posttrain.data.tasks.audit import CORPUS_FILE
    from posttrain.train.pretrain import PretrainRecipe, corpus_records, resolve_output_dir

    cfg = PretrainRecipe()
    cached = resolve_output_dir(cfg) / CORPUS_FILE
    if cached.is_file():
        with gzip.open(cached, "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
    else:
        docs = corpus_records(cfg.corpus, cfg.seed)[0]
    print(f"default corpus: {len(docs)} documents ({cached if cached.is_file() else 'regenerated'})")
    out = folder / "default_corpus.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for d in docs:
            reply = d["text"][len(d["question"]) :].lstrip("\n")
            messages = [{"role": "user", "content": d["question"]}, {"role": "assistant", "content": reply}]
            f.write(
                json.dumps({"messages": messages, "metadata": {"task": d["task"], "level": d["level"]}})
                + "\n"
            )
    return out


def test_questions(folder: Path, per_level: int) -> Path:
    """Up to ``per_level`` test questions of every task and level (tiny levels have fewer), as a
    prompt file; the test split is every question whose hash falls in the level's test share."""
    from posttrain.data.tasks import TASKS
    from posttrain.data.tasks.split import make_split
    from posttrain.errors import ConfigError

    out, rows = folder / "test_questions.jsonl", []
    for name in sorted(TASKS):
        for level in TASKS[name].levels:
            n = per_level
            while n > 0:
                try:
                    rows += [p.question for p in make_split(name, "test", n, levels=[level])]
                    break
                except ConfigError:
                    n = n * 3 // 4
    out.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in rows))
    print(f"eval set: {len(rows)} test questions of {len(TASKS)} tasks")
    return out


def clean_default_corpus(folder: Path, per_level: int, engine: str) -> None:
    data = default_corpus(folder)
    evals = test_questions(folder, per_level)
    raw = {"inputs": [str(data)], "output_dir": str(folder / "default_out"), "engine": engine,
           "decontam": {"evals": [str(evals)]}}  # fmt: skip
    start = time.perf_counter()
    out = run_clean(from_dict(CleanRecipe, raw))
    report = json.loads((out / "report.json").read_text())
    print(f"cleaned in {time.perf_counter() - start:.1f} s: {json.dumps(report)}")
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in removed[:5]:
        print(f"  {r['rule']}: {r['where']} {json.dumps(r['evidence'])[:200]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--no-peer", action="store_true", help="skip the datasketch-only loop")
    ap.add_argument("--keep", help="write the data and the output here (default: a temp folder, removed)")
    ap.add_argument("--engine", choices=["local", "ray"], default="local")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster (engine ray)")
    ap.add_argument("--default-corpus", action="store_true", help="clean the default model's corpus instead")
    ap.add_argument("--test-per-level", type=int, default=300, help="test problems per task and level")
    args = ap.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench_clean_"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.engine == "ray":
        import ray

        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        if args.default_corpus:
            clean_default_corpus(folder, args.test_per_level, args.engine)
            return
        t0 = time.perf_counter()
        data, evals, texts = synth(args.records, folder)
        print(
            f"wrote {args.records} records in {time.perf_counter() - t0:.1f} s ({data.stat().st_size / 1e6:.0f} MB)"
        )
        recipe = from_dict(
            CleanRecipe,
            {
                "inputs": [str(data)],
                "output_dir": str(folder / "out"),
                "decontam": {"evals": [str(evals)]},
                "engine": args.engine,
            },  # fmt: skip
        )
        start = time.perf_counter()
        out = run_clean(recipe)
        elapsed = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
        rss = peak_rss_mb() * 2**20 / 1e9
        print(f"run_clean: {elapsed:.1f} s, peak RSS {rss:.2f} GB, removed {report['removed']}")
        if not args.no_peer:
            rate, dups = peer(texts)
            print(
                f"peer (datasketch MinHash + MinHashLSH alone, in memory): {rate:.0f} records/s, {dups} dups"
            )
        print(
            f"posttrain data clean ({args.engine}): {args.records / elapsed:.0f} records/s on {cpu_model()}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
