"""`run_clean` end to end: the report, kept/removed files, atomic output, reruns, mixing, the CLI, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from quality_helpers import chat, read_jsonl, write_jsonl

from posttrain.config import from_dict
from posttrain.data.quality.clean import CleanRecipe, run_clean
from posttrain.data.quality.items import RULES
from posttrain.errors import ConfigError, DataError, PosttrainError

LONG = " ".join(f"w{i}" for i in range(40))
EVAL_Q = "What is the boiling point of water at sea level in degrees Celsius on a normal day"


def recipe(tmp_path, inputs, **raw) -> CleanRecipe:
    return from_dict(CleanRecipe, {"inputs": inputs, "output_dir": str(tmp_path / "out"), **raw})


@pytest.fixture
def mixed_file(jsonl):
    rows = [
        {"prompt": "Tell me about cats.", "completion": "Cats are small felines."},  # 1 kept
        {"prompt": "TELL me  about cats.", "completion": "cats are small felines."},  # 2 exact_dup of 1
        {"prompt": LONG, "completion": "ok"},  # 3 kept
        {"prompt": LONG.replace("w17", "changed"), "completion": "ok"},  # 4 near_dup of 3
        "{not json",  # 5 invalid
        {"prompt": "   ", "completion": "something"},  # 6 invalid: empty user turn
        {"prompt": f"Quick one: {EVAL_Q}?", "completion": "100"},  # 7 contaminated
        {"foo": "no text"},  # 8 invalid: no record kind
    ]
    return jsonl("in.jsonl", rows), rows


def test_report_kept_and_removed(tmp_path, jsonl, mixed_file):
    path, rows = mixed_file
    evals = jsonl("eval.jsonl", [{"prompt": EVAL_Q, "completion": "100"}])
    out = run_clean(recipe(tmp_path, [path], decontam={"evals": [evals]}))
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"input", "kept", "removed"} and list(report["removed"]) == list(RULES)
    assert report["input"] == 8 and report["kept"] == 2
    assert {k: v for k, v in report["removed"].items() if v} == {
        "invalid": 3,
        "exact_dup": 1,
        "near_dup": 1,
        "contaminated": 1,
    }
    assert read_jsonl(out / "kept.jsonl") == [rows[0], rows[2]]  # as read: the string prompt stays a string
    removed = {r["where"].rsplit(":", 1)[1]: r for r in read_jsonl(out / "removed.jsonl")}
    assert removed["2"]["evidence"] == {"duplicate_of": f"{path}:1"}
    assert removed["4"]["evidence"]["representative"] == f"{path}:3" and removed["4"]["record"] == rows[3]
    assert removed["5"]["rule"] == "invalid" and "invalid JSON" in removed["5"]["evidence"]["error"]
    assert removed["6"]["evidence"] == {"check": "empty_turn", "field": "prompt[0]"}
    assert removed["7"]["evidence"]["eval"] == f"{evals}:1"
    assert "record kind" in removed["8"]["evidence"]["error"]
    assert not list(tmp_path.glob("out.tmp-*"))


def test_exception_mid_run_leaves_no_output(tmp_path, jsonl):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(50)] + ["{broken"]
    path = jsonl("in.jsonl", rows)
    with pytest.raises(DataError, match="invalid JSON") as err:
        run_clean(recipe(tmp_path, [path], on_invalid="stop"))
    assert err.value.where == f"{path}:51"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    # a failing rerun leaves the previous complete output as it was
    good = run_clean(recipe(tmp_path, [path]))
    before = (good / "kept.jsonl").read_text()
    with pytest.raises(DataError):
        run_clean(recipe(tmp_path, [path], on_invalid="stop"))
    assert (good / "kept.jsonl").read_text() == before


def test_killed_run_leaves_no_output(tmp_path):
    path = write_jsonl(
        tmp_path / "big.jsonl", ({"prompt": f"q {i} {LONG}", "completion": "a"} for i in range(150_000))
    )
    out = tmp_path / "out"
    code = (
        "import sys; from posttrain.config import from_dict; "
        "from posttrain.data.quality.clean import CleanRecipe, run_clean; "
        "run_clean(from_dict(CleanRecipe, {'inputs': [sys.argv[1]], 'output_dir': sys.argv[2]}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, path, str(out)], cwd=Path(__file__).parents[3])
    tmp = tmp_path / f"out.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    while not (tmp / "kept.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.exists() and not out.exists()
    small = write_jsonl(tmp_path / "small.jsonl", [chat("q", "a")])
    run_clean(from_dict(CleanRecipe, {"inputs": [small], "output_dir": str(out)}))
    assert not tmp.exists()  # the dead run's folder is swept
    assert json.loads((out / "report.json").read_text())["kept"] == 1


def test_rerun_with_same_recipe_does_nothing(tmp_path, jsonl):
    path = jsonl("in.jsonl", [chat("a", "b"), chat("c", "d")])
    out = run_clean(recipe(tmp_path, [path]))
    stamp = (out / "report.json").stat().st_mtime_ns
    time.sleep(0.01)
    assert run_clean(recipe(tmp_path, [path])) == out
    assert (out / "report.json").stat().st_mtime_ns == stamp
    run_clean(recipe(tmp_path, [path], dedup={"threshold": 0.9}))
    assert (out / "report.json").stat().st_mtime_ns != stamp


def test_mixing_two_files_by_ratio(tmp_path, jsonl):
    a = jsonl("a.jsonl", [chat(f"alpha {i}", f"x {i}") for i in range(300)])
    b = jsonl("b.jsonl", [chat(f"beta {i}", f"y {i}") for i in range(100)])
    rec = recipe(tmp_path, [{"path": a, "ratio": 3}, {"path": b, "ratio": 1}], dedup={"near": False})
    out = run_clean(rec)
    kept = read_jsonl(out / "kept.jsonl")
    assert len(kept) == 400 and sum(r["messages"][0]["content"].startswith("beta") for r in kept) == 100
    rec.mix.total = 200
    rec.mix.seed = 1
    kept = read_jsonl(run_clean(rec) / "kept.jsonl")
    assert len(kept) == 200 and sum(r["messages"][0]["content"].startswith("alpha") for r in kept) == 150
    assert json.loads((out / "report.json").read_text())["kept"] == 200
    assert not list(out.glob("part-*"))
    rec.mix.total = 500
    with pytest.raises(DataError, match="asks 375 records of inputs\\[0\\]"):
        run_clean(rec)


def test_token_budgets_and_length_with_a_real_tokenizer(tmp_path, jsonl, tiny_model_dir):
    a = jsonl("a.jsonl", [chat(f"Compute {i} + {i}", f"Answer: {2 * i}") for i in range(200)])
    b = jsonl("b.jsonl", [chat(f"Sort {i} 3 1", "Answer: 1 3") for i in range(200)])
    rec = recipe(
        tmp_path,
        [{"path": a, "tokens": 500}, {"path": b, "tokens": 100}],
        tokenizer=str(tiny_model_dir),
        dedup={"near": False},
    )
    kept = read_jsonl(run_clean(rec) / "kept.jsonl")
    from posttrain.models.load import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    n = {"Compute": 0, "Sort": 0}
    for row in kept:
        text = "\n".join(m["content"] for m in row["messages"])
        n[row["messages"][0]["content"].split()[0]] += len(tok(text, add_special_tokens=False)["input_ids"])
    assert abs(n["Compute"] - 500) < 60 and abs(n["Sort"] - 100) < 30, n
    with pytest.raises(DataError, match="larger than inputs\\[1\\]"):
        run_clean(
            recipe(
                tmp_path,
                [{"path": a, "tokens": 5}, {"path": b, "tokens": 10**7}],
                tokenizer=str(tiny_model_dir),
            )
        )


def test_bad_input(tmp_path, jsonl):
    odd = tmp_path / "data.txt"
    odd.write_text("hello\n")
    with pytest.raises(DataError, match="unsupported data file type"):
        run_clean(recipe(tmp_path, [str(odd)]))
    no_text = jsonl("nt.jsonl", [chat("a", "b"), {"text": "a pretraining document"}])
    with pytest.raises(DataError, match="cannot tell the record kind") as err:
        run_clean(recipe(tmp_path, [no_text], on_invalid="stop"))
    assert err.value.where == f"{no_text}:2"
    with pytest.raises(PosttrainError) as err:
        run_clean(
            recipe(tmp_path, [no_text], tokenizer=str(tmp_path / "no_model"), filters={"max_tokens": 10})
        )
    assert "tokenizer" in err.value.where
    with pytest.raises(ConfigError, match="token budgets need a tokenizer"):
        run_clean(recipe(tmp_path, [{"path": no_text, "tokens": 10}]))
    other = jsonl("pref.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="different record kinds"):
        run_clean(recipe(tmp_path, [no_text, other]))
    assert not (tmp_path / "out").exists()


def test_cli_short_form_and_recipe_form(tmp_path, jsonl, mixed_file):
    from typer.testing import CliRunner

    from posttrain.cli import app

    path, _ = mixed_file
    evals = jsonl("eval.jsonl", [{"prompt": EVAL_Q}])
    out = tmp_path / "cli_out"
    args = ["data", "clean", path, str(out), "--decontaminate", evals, "--no-near-dup"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "contaminated" in res.output  # the console table
    removed = json.loads((out / "report.json").read_text())["removed"]
    assert removed["near_dup"] == 0 and removed["contaminated"] == 1
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"inputs: [{path}]\noutput_dir: {tmp_path / 'r_out'}\n")
    res = CliRunner().invoke(
        app, ["clean", str(recipe_file), "dedup.threshold=0.95", "--near-dup-threshold", "0.5"]
    )
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "r_out" / "run.json").read_text())
    assert run["recipe"]["dedup"]["threshold"] == 0.5  # the option is applied after the overrides
    res = CliRunner().invoke(app, ["data", "clean", path])
    assert isinstance(res.exception, ConfigError)


def test_shipped_recipe_cleans_the_task_suite(tmp_path):
    from posttrain.data.quality.clean import clean_main

    recipe_path = Path(__file__).parents[3] / "recipes" / "clean_tiny.yaml"
    out = clean_main(str(recipe_path), [f"output_dir={tmp_path / 'tiny'}"])
    report = json.loads((out / "report.json").read_text())
    assert report["input"] == 800 and report["removed"]["unverified"] == 0  # the suite's own chains verify
    assert report["removed"]["exact_dup"] > 0  # easy levels repeat questions in the train split
    removed = read_jsonl(out / "removed.jsonl")
    # train and test are disjoint by question, so a contaminated train record only contains a test question
    assert all(r["evidence"]["match"] != "exact question" for r in removed if r["rule"] == "contaminated")
    assert report["kept"] + sum(report["removed"].values()) == 800


def test_memory_is_flat_in_the_number_of_records(tmp_path):
    """Without the dedup indexes, peak traced memory does not grow with the input (streaming)."""
    import tracemalloc

    def peak(n: int) -> int:
        path = write_jsonl(tmp_path / f"in{n}.jsonl", (chat(f"q {i} {LONG}", f"a {i}") for i in range(n)))
        rec = recipe(
            tmp_path, [path], output_dir=str(tmp_path / f"o{n}"), dedup={"exact": False, "near": False}
        )
        tracemalloc.start()
        run_clean(rec)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    peak(200)  # first-use imports (rich, datasketch) allocate too
    small, large = peak(1000), peak(4000)
    assert large < 1.3 * small, (small, large)
