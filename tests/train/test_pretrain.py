"""Pretraining the tiny default: corpus mixing/dedup, determinism, caching, `model.path: default`."""

from __future__ import annotations

from collections import Counter

import torch
from safetensors.torch import load_file

from posttrain.config import load_recipe
from posttrain.data.tasks.audit import MANIFEST_FILE, audit_corpus
from posttrain.train.loop import resolve_model_path
from posttrain.train.pretrain import CorpusConfig, PretrainRecipe, build_corpus, recipe_key, run_pretrain


def test_corpus_follows_mix_is_deduplicated_and_deterministic():
    cfg = CorpusConfig(tasks=["arith", "sort"], mix={"arith": 3.0}, n_docs=400)
    docs = build_corpus(cfg, seed=1)
    assert len(docs) == len(set(docs)) == 400
    kinds = Counter("Sort" if d.startswith("Sort") else "arith" for d in docs)
    assert kinds["arith"] == 300 and kinds["Sort"] == 100
    assert build_corpus(cfg, seed=1) == docs and build_corpus(cfg, seed=2) != docs


def _tiny(tmp_path, *extra: str) -> PretrainRecipe:
    return load_recipe(
        PretrainRecipe,
        None,
        [
            f"output_dir={tmp_path / 'pt'}",
            "model.hidden_size=32",
            "model.num_layers=1",
            "model.intermediate_size=64",
            "model.vocab_size=300",
            "corpus.n_docs=300",
            "train.max_steps=8",
            "train.batch_size=4",
            "train.seq_len=128",
            "train.tensorboard=false",
            *extra,
        ],
    )


def test_pretrain_is_deterministic_and_cached(tmp_path):
    final = run_pretrain(_tiny(tmp_path))
    first = load_file(final / "model.safetensors")
    again = run_pretrain(_tiny(tmp_path))  # reuses, does not retrain
    assert again == final
    other = run_pretrain(_tiny(tmp_path, f"output_dir={tmp_path / 'pt2'}"))
    second = load_file(other / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    losses = [ln for ln in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8
    # The run records its corpus: it matches its manifest and holds no test question.
    assert audit_corpus(tmp_path / "pt")["test_questions"] == 0
    assert (final / MANIFEST_FILE).read_text() == (tmp_path / "pt" / MANIFEST_FILE).read_text()


def test_default_path_resolves_to_cache_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    final = tmp_path / f"default-{recipe_key(PretrainRecipe())}" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    assert resolve_model_path("default") == str(final)
    assert resolve_model_path("/some/dir") == "/some/dir"


def test_recipe_key_ignores_output_dir_and_force():
    assert recipe_key(PretrainRecipe(output_dir="x", force=True)) == recipe_key(PretrainRecipe())
    assert recipe_key(PretrainRecipe(seed=1)) != recipe_key(PretrainRecipe())
    contaminated = PretrainRecipe(corpus=CorpusConfig(exclude_test=False))
    assert recipe_key(contaminated) != recipe_key(PretrainRecipe())
    # the contaminated default's key (corpus v1) and the exact-question-only one (v2)
    assert recipe_key(PretrainRecipe()) not in ("425ff4d45237", "c273d733eeee")
    shipped = load_recipe(PretrainRecipe, "recipes/pretrain_tiny.yaml")
    assert (
        recipe_key(shipped) == "d2e786226544"
    )  # a new field changes it: add a logging-only one to LOGGING_ONLY, else bump it here
    assert recipe_key(
        load_recipe(PretrainRecipe, "recipes/pretrain_tiny.yaml", ["train.loggers=[mlflow]"])
    ) == ("d2e786226544")  # where the metrics go is not part of what is learned


def test_a_build_in_progress_is_waited_for_not_repeated(tmp_path):
    """A second process asking for the same model waits for the lock, then reuses the result."""
    import threading
    import time

    from posttrain.train.pretrain import build_lock

    cfg = _tiny(tmp_path)
    out = tmp_path / "pt"
    got: list = []
    with build_lock(out):
        waiter = threading.Thread(target=lambda: got.append(run_pretrain(cfg)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not got  # blocked on the lock
        (out / "final").mkdir(parents=True)
        (out / "final" / "config.json").write_text("{}")  # the "other process" finishes
    waiter.join(timeout=30)
    assert got == [out / "final"] and not (out / "metrics.jsonl").exists()  # reused, not retrained
