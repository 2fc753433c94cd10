"""``engine: ray`` keeps exactly what the local engine keeps, on a local one-CPU Ray cluster."""

from __future__ import annotations

import json
import random
import sys

import pytest
from quality_helpers import read_jsonl

from posttrain.config import from_dict
from posttrain.data.quality.clean import CleanRecipe, run_clean
from posttrain.errors import BackendUnavailable, DataError

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # its own cluster
    yield
    ray.shutdown()


def corpus(tmp_path, n=600, seed=0):
    """Generated prompt/completion rows: exact copies up to case/space, one-word edits, eval
    questions, bad lines, empty turns, garbage symbols."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    questions = [" ".join(rng.choices(vocab, k=15)) for _ in range(20)]
    rows: list = []
    plain: list[dict] = []
    for i in range(n):
        u = rng.random()
        if plain and u < 0.1:
            base = rng.choice(plain)
            rows.append({"prompt": base["prompt"].upper(), "completion": "  " + base["completion"]})
        elif plain and u < 0.2:
            base = rng.choice(plain)
            words = base["prompt"].split()
            words[rng.randrange(len(words))] = "edited"
            rows.append({"prompt": " ".join(words), "completion": base["completion"]})
        elif u < 0.23:
            rows.append({"prompt": f"Please answer: {rng.choice(questions)}", "completion": "x"})
        elif u < 0.25:
            rows.append("{broken json" if i % 2 else {"prompt": " ", "completion": "y"})
        elif u < 0.27:
            rows.append({"prompt": "#$%^&*" * 8, "completion": "@@@@"})
        else:
            plain.append(
                {
                    "prompt": " ".join(rng.choices(vocab, k=40)),
                    "completion": " ".join(rng.choices(vocab, k=5)),
                }
            )
            rows.append(plain[-1])
    data = tmp_path / "data.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return str(data), str(evals)


def _recipe(tmp_path, data, evals, engine, **extra):
    raw = {"inputs": [data], "output_dir": str(tmp_path / engine), "engine": engine,
           "filters": {"max_symbol_ratio": 0.5}, "decontam": {"evals": [evals]}, **extra}  # fmt: skip
    return from_dict(CleanRecipe, raw)


def test_ray_engine_keeps_the_same_records_as_the_local_engine(tmp_path, local_ray):
    data, evals = corpus(tmp_path)
    local = run_clean(_recipe(tmp_path, data, evals, "local"))
    on_ray = run_clean(_recipe(tmp_path, data, evals, "ray", ray_batch_size=64, ray_window=250))
    report = json.loads((local / "report.json").read_text())
    assert json.loads((on_ray / "report.json").read_text()) == report
    for rule in ("invalid", "symbols", "exact_dup", "near_dup", "contaminated"):
        assert report["removed"][rule] > 0, (rule, report)
    assert (on_ray / "kept.jsonl").read_text() == (local / "kept.jsonl").read_text()
    assert read_jsonl(on_ray / "removed.jsonl") == read_jsonl(local / "removed.jsonl")


def test_ray_engine_stops_on_an_invalid_row_when_asked(tmp_path, local_ray):
    data, evals = corpus(tmp_path, n=120)
    with pytest.raises(DataError, match="data.jsonl:"):
        run_clean(_recipe(tmp_path, data, evals, "ray", on_invalid="stop"))


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    data, evals = corpus(tmp_path, n=10)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(BackendUnavailable, match=r"posttrain\[ray\]"):
        run_clean(_recipe(tmp_path, data, evals, "ray"))
