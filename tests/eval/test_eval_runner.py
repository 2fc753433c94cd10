"""`posttrain eval`: results.json and report.md, scoring, bad input, partial results and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import ConfigError, DataError
from posttrain.eval.data import EvalDataConfig
from posttrain.eval.metrics import pass_at_k
from posttrain.eval.runner import DecodingConfig, EvalRecipe, run_eval
from posttrain.search.compare import SearchModelConfig

ROWS = [
    {"id": "q1", "prompt": "What is 2+3?", "metadata": {"scorer": "math", "ground_truth": "5"}, "reference": "Answer: 5"},
    {"id": "q2", "prompt": "What is 7*6?", "metadata": {"scorer": "math", "ground_truth": "42", "tags": ["mul"]},
     "reference": "Answer: 41"},
    {"id": "q3", "prompt": "Compute 12 + 7", "metadata": {"scorer": "arith", "ground_truth": "19", "level": 1},
     "reference": "<think>12 + 7 = 19</think>\nAnswer: 19"},
]  # fmt: skip


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_reference_run_scores_metrics_keeps_fields_and_writes_report(tmp_path):
    data = write_rows(tmp_path / "mine.jsonl", ROWS)
    recipe = EvalRecipe(
        data=[EvalDataConfig(path=str(data))], reference=True, output_dir=str(tmp_path / "out")
    )
    results = load(run_eval(recipe))
    assert results["status"] == "complete"
    m = results["metrics"]["reference"]
    assert m["accuracy"]["value"] == pytest.approx(2 / 3) and m["accuracy"]["n"] == 3
    assert m["accuracy"]["ci_low"] <= 2 / 3 <= m["accuracy"]["ci_high"]
    assert m["maj@1"]["value"] == pytest.approx(2 / 3)
    problems = results["problems"]
    assert [p["id"] for p in problems] == ["q1", "q2", "q3"]
    assert problems[1]["where"].endswith("mine.jsonl:2") and problems[1]["tags"] == ["mul"]
    assert [p["decodings"]["reference"]["samples"][0]["score"] for p in problems] == [1.0, 0.0, 1.0]
    assert problems[1]["decodings"]["reference"]["samples"][0]["answer"] == "41"
    assert results["breakdown"]["reference"]["tag"]["mul"]["accuracy"]["value"] == 0.0
    assert results["breakdown"]["reference"]["source"]["mine"]["accuracy"]["n"] == 3
    # one line per problem in the file
    lines = (tmp_path / "out" / "results.json").read_text().splitlines()
    assert sum(line.lstrip().startswith('{"id": ') for line in lines) == 3
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| accuracy | 66.7 [" in report


def test_row_without_scorer_names_file_line(tmp_path):
    rows = [ROWS[0], {"prompt": "2+2?", "metadata": {"ground_truth": "4"}}]
    data = write_rows(tmp_path / "d.jsonl", rows)
    recipe = EvalRecipe(data=[EvalDataConfig(path=str(data))], reference=True, output_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"d\.jsonl:2: row has no metadata\.scorer"):
        run_eval(recipe)
    assert not (tmp_path / "o" / "results.json").exists()  # checked before any work
    recipe.data[0].scorer = "math"  # the source's default scorer fills the gap
    with pytest.raises(DataError, match=r"d\.jsonl:2: no reference completion"):
        run_eval(recipe)


def test_unknown_scorer_is_a_config_error_with_did_you_mean(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "x", "metadata": {"scorer": "mth"}}])
    recipe = EvalRecipe(data=[EvalDataConfig(path=str(data))], reference=True)
    with pytest.raises(ConfigError, match=r"d\.jsonl:2: metadata\.scorer: unknown reward 'mth'") as err:
        run_eval(recipe)
    assert "did you mean 'math'" in err.value.render()


def test_k_greater_than_n_is_a_config_error(tmp_path):
    from posttrain.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("decodings:\n  - n: 4\n    temperature: 0.8\nk: [1, 8]\n")
    with pytest.raises(ConfigError, match=r"k: pass@8 / maj@8 need k <= n, but n = 4"):
        load_recipe(EvalRecipe, path)
    path.write_text("decodings:\n  - n: 4\n    temperature: 0.8\n    k: [1, 4]\n")
    assert load_recipe(EvalRecipe, path).decodings[0].ks([1, 8]) == [1, 4]


def test_partial_results_saved_before_a_failure_then_resumed(tmp_path):
    good, bad = ROWS[0], {"prompt": "x", "metadata": {"scorer": "math"}, "reference": "Answer: 1"}
    data = write_rows(tmp_path / "d.jsonl", [good, bad])
    out = tmp_path / "out"
    recipe = EvalRecipe(
        data=[EvalDataConfig(path=str(data))], reference=True, save_every=1, output_dir=str(out)
    )
    with pytest.raises(DataError, match="ground_truth"):  # the math reward fails on row 2
        run_eval(recipe)
    partial = load(out / "results.json")
    assert partial["status"] == "partial" and "ground_truth" in partial["error"]
    assert [p["id"] for p in partial["problems"]] == ["q1"]
    assert partial["metrics"]["reference"]["accuracy"]["n"] == 1
    write_rows(data, [good, {**bad, "metadata": {"scorer": "math", "ground_truth": "1"}}])
    done = load(run_eval(recipe))
    assert done["status"] == "complete" and done["metrics"]["reference"]["accuracy"]["value"] == 1.0
    stamp = (out / "results.json").stat().st_mtime_ns
    run_eval(recipe)  # complete for this recipe: nothing redone
    assert (out / "results.json").stat().st_mtime_ns == stamp


def test_sampling_and_search_on_a_tiny_model(tiny_model_dir, tmp_path):
    from posttrain.rewards.registry import score_batch

    recipe = EvalRecipe(
        model=SearchModelConfig(path=str(tiny_model_dir)),
        data=[EvalDataConfig(tasks=["arith"], levels=[1, 2], n_per_level=3)],
        decodings=[
            DecodingConfig(max_new_tokens=8),
            DecodingConfig(n=4, temperature=1.0, max_new_tokens=8),
            DecodingConfig(
                strategy="best_of_n", strategy_config={"n": 2, "select": "verifier"}, max_new_tokens=8
            ),
        ],  # fmt: skip
        k=[1, 2, 4],
        save_every=4,
        output_dir=str(tmp_path / "out"),
    )
    results = load(run_eval(recipe))
    assert set(results["metrics"]) == {"greedy", "sample_n4_t1", "best_of_n"}
    assert set(results["breakdown"]["sample_n4_t1"]["level"]) == {"arith/L1", "arith/L2"}
    problems = results["problems"]
    assert len(problems) == 6
    pass2 = []
    for p in problems:
        samples = p["decodings"]["sample_n4_t1"]["samples"]
        assert len(samples) == 4 and len(p["decodings"]["greedy"]["samples"]) == 1
        meta = [{"scorer": "arith", "ground_truth": p["ground_truth"], "task": "arith"}] * 4
        rescored = score_batch([None] * 4, [s["text"] for s in samples], meta)
        assert [r.score for r in rescored] == [s["score"] for s in samples]
        assert all(0 < s["tokens"] <= 8 for s in samples)
        pass2.append(pass_at_k(4, sum(s["correct"] for s in samples), 2))
        search = p["decodings"]["best_of_n"]
        assert len(search["samples"]) == 1 and search["extra_tokens"] >= 0
    assert results["metrics"]["sample_n4_t1"]["pass@2"]["value"] == pytest.approx(sum(pass2) / 6)
    search_m = results["metrics"]["best_of_n"]
    assert search_m["tokens_per_problem"]["value"] > search_m["response_length"]["value"]
    assert results["timing"]["greedy"]["generated_tokens"] > 0
    from posttrain.models.load import load_model
    from posttrain.rollout.hf_engine import decode_precision

    # model.precision: auto, decided per machine and model (fp32 for this small one), and recorded
    used, reason = decode_precision("auto", load_model(tiny_model_dir, dtype="float32"), torch.device("cpu"))
    assert results["precision"] == {"requested": "auto", "used": used, "reason": reason}


def test_greedy_batched_equals_one_prompt_at_a_time(tiny_model_dir, tmp_path):
    from posttrain.eval.data import load_items
    from posttrain.eval.runner import generate_chunk, load_decoder

    items = load_items(EvalDataConfig(tasks=["arith", "sort"], levels=[1, 2], n_per_level=3))
    decoder = load_decoder(SearchModelConfig(path=str(tiny_model_dir), prompt="plain"))
    dec = DecodingConfig(max_new_tokens=10)
    batched = [g[0] for g in generate_chunk(dec, decoder, items, 0)]
    alone = [generate_chunk(dec, decoder, [it], 0)[0][0] for it in items]
    assert batched == alone


def test_stop_strings_end_samples_at_their_first_occurrence(tiny_model_dir):
    """A decoding's ``stop`` ends each greedy text right after the stop string's first occurrence
    (within its last token), a prefix of the text decoded without it; texts without it are unchanged;
    a search strategy with stop strings is a ConfigError."""
    from posttrain.eval.data import load_items
    from posttrain.eval.runner import generate_chunk, load_decoder

    items = load_items(EvalDataConfig(tasks=["arith", "sort"], levels=[1, 2], n_per_level=3))
    decoder = load_decoder(SearchModelConfig(path=str(tiny_model_dir), prompt="plain"))
    full = generate_chunk(DecodingConfig(max_new_tokens=16), decoder, items, 0)
    stop = full[0][0][0][3:5]  # a string the first completion is known to contain
    cut = generate_chunk(DecodingConfig(max_new_tokens=16, stop=[stop]), decoder, items, 0)
    hits = 0
    for (whole, n_whole, _, _), (short, n_short, why, _) in zip(full, cut, strict=True):
        at = whole[0].find(stop)
        if at < 0:
            assert (short[0], n_short) == (whole[0], n_whole)
            continue
        hits += 1
        assert whole[0].startswith(short[0]) and short[0].find(stop) == at and why == ["stop"]
        assert n_short[0] < n_whole[0] or whole[0].endswith(stop)
    assert hits >= 1
    recipe = EvalRecipe(decodings=[DecodingConfig(strategy="best_of_n", stop=["\n"])])
    with pytest.raises(ConfigError, match="stop strings apply to sampling") as err:
        recipe.validate()
    assert err.value.where == "decodings[0].stop"


def test_short_form_command_line(tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    data = write_rows(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "o"
    args = ["eval", "default", "--data", str(data), "--reference", "--limit", "2", "--output-dir", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "reference: accuracy 0.500" in result.output
    assert [p["id"] for p in load(out / "results.json")["problems"]] == ["q1", "q2"]
    bad = CliRunner().invoke(app, ["eval", "default", "--data", str(data), "--k", "1,4"])
    assert isinstance(bad.exception, ConfigError) and "n = 1" in str(bad.exception)
    none = CliRunner().invoke(app, ["eval", "default"])
    assert isinstance(none.exception, ConfigError) and "--data" in str(none.exception)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  - path: {data}\nreference: true\noutput_dir: {out}\n")
    result = CliRunner().invoke(app, ["eval", str(recipe), "limit=1"])
    assert result.exit_code == 0, result.output
    assert len(load(out / "results.json")["problems"]) == 1


def test_recipe_evaluator_runs_on_a_model_in_memory(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.eval.hook import recipe_evaluator

    data = write_rows(tmp_path / "held.jsonl", ROWS)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"data:\n  - path: {data}\ndecodings:\n  - max_new_tokens: 6\n")
    evaluate = recipe_evaluator(recipe, tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    metrics = evaluate(model, AutoTokenizer.from_pretrained(tiny_model_dir), 5)
    assert model.training  # restored
    assert metrics["greedy/accuracy"] == 0.0 and metrics["greedy/response_length"] <= 6
    assert metrics["greedy/accuracy/ci_high"] >= metrics["greedy/accuracy/ci_low"]
    results = load(tmp_path / "run" / "eval" / "step_000005" / "results.json")
    assert [p["id"] for p in results["problems"]] == ["q1", "q2", "q3"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data:\n  - path: {tmp_path / 'missing.jsonl'}\n")
    with pytest.raises(DataError, match="not found"):
        recipe_evaluator(bad, tmp_path / "run")  # before any training
