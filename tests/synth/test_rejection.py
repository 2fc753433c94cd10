"""Rejection sampling (`posttrain filter`): pass@k, selection modes, verified-only output, errors."""

from __future__ import annotations

import json
from math import comb

import pytest
import torch

from posttrain.config import load_recipe
from posttrain.data.loaders import load_records
from posttrain.data.tasks import task_problems
from posttrain.errors import ConfigError, DataError
from posttrain.rewards.verifiers import verify_task
from posttrain.synth.rejection import FilterRecipe, choose, pass_at_k, run_filter


def test_pass_at_k_hand_values_and_the_binomial_form():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)  # pass@1 = c/n
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(3, 2, 2) == 1.0  # n - c < k
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_choose_best_and_all_with_threshold_ties_and_duplicates():
    scores, ok = [0.5, 1.0, 1.0, 0.2, 1.0], [True, True, True, True, False]
    texts = ["a", "b  x", "b x", "c", "d"]
    assert choose(scores, ok, texts, "best", 1.0, None) == ([1], 0)  # tie 1 vs 2: lower index
    assert choose(scores, ok, texts, "all", 0.5, None) == ([0, 1, 2], 0)  # 4 is not eligible
    assert choose(scores, ok, texts, "all", 0.5, set()) == ([0, 1], 1)  # "b x" normalises like "b  x"
    assert choose(scores, ok, texts, "best", float("-inf"), None) == ([1], 0)
    assert choose([0.0, 0.3], [True, True], ["a", "b"], "best", 1.0, set()) == ([], 0)
    seen = {"b x"}  # kept for an identical prompt earlier: the best is then the other 1.0
    assert choose(scores, ok, texts, "best", 1.0, seen) == ([], 2)
    seen = set()
    choose(scores, ok, texts, "best", 0.0, seen)
    assert seen == {"b x"}  # only the kept text is remembered


def _write_generations(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows():
    """4 arith prompts with hand-made completions: right, wrong, a whitespace duplicate, truncated, blank."""
    problems = task_problems(["arith"], "train", 2, seed=0, levels=[1, 2])[:4]
    rows = []
    for i, p in enumerate(problems):
        right, wrong = (
            p.response(),
            p.response().replace(f"Answer: {p.answer}", f"Answer: {int(p.answer) + 1}"),
        )
        texts = [wrong, right, right.replace("\n", "\n  "), right, "  "] if i < 3 else [wrong, wrong]
        reasons = ["stop", "stop", "stop", "length", "stop"] if i < 3 else ["stop", "stop"]
        rec = p.prompt_record()
        comps = [
            {"text": t, "finish_reason": f, "token_ids": [1], "logprobs": [-1.0]}
            for t, f in zip(texts, reasons, strict=True)
        ]
        rows.append({"index": i, **rec, "sampling": {"max_new_tokens": 64}, "completions": comps})
    return rows


def _recipe(tmp_path, src, *extra):
    return load_recipe(FilterRecipe, None, [f"input={src}", f"output_dir={tmp_path / 'f'}", *extra])


def _expected(rows, keep_all):
    """(generation index, sample index) kept, computed with the task verifier directly."""
    out = set()
    for r in rows:
        m = r["metadata"]
        ok = [
            verify_task(c["text"], m["task"], m["ground_truth"])
            and c["text"].strip()
            and c["finish_reason"] == "stop"
            for c in r["completions"]
        ]
        seen = set()
        for i, c in enumerate(r["completions"]):
            key = " ".join(c["text"].split())
            if ok[i] and key not in seen:
                seen.add(key)
                out.add((r["index"], i))
                if not keep_all:
                    break
    return out


@pytest.mark.parametrize("keep", ["all", "best"])
def test_filter_keeps_exactly_the_verified_completions(tmp_path, keep):
    rows = _rows()
    out = run_filter(_recipe(tmp_path, _write_generations(tmp_path / "g.jsonl", rows), f"keep={keep}"))
    records = load_records(out)  # the data layer reads it (what `posttrain data validate` runs)
    assert all(r.kind == "chat" for r in records)
    kept = {(r.data["metadata"]["generation_index"], r.data["metadata"]["sample_index"]) for r in records}
    assert kept == _expected(rows, keep == "all") == {(0, 1), (1, 1), (2, 1)}
    for r in records:
        row = rows[r.data["metadata"]["generation_index"]]
        assert r.data["messages"][:-1] == row["prompt"] and r.data["metadata"]["reward"] == 1.0
        assert (
            r.data["messages"][-1]["content"]
            == row["completions"][r.data["metadata"]["sample_index"]]["text"]
        )
    report = json.loads((tmp_path / "f" / "filter_report.json").read_text())
    ov = report["overall"]
    # 3 prompts x 3 passing of 5 (right, its duplicate, the truncated right) + 1 prompt 0 of 2
    assert (ov["prompts"], ov["completions"], ov["passed"], ov["kept"]) == (4, 17, 9, 3)
    assert ov["pass_rate"] == pytest.approx(9 / 17) and ov["kept_fraction"] == pytest.approx(3 / 17)
    assert ov["duplicates"] == 3  # the whitespace copy of each right answer
    assert ov["pass@1"] == pytest.approx((3 * 3 / 5 + 0) / 4)
    assert ov["pass@2"] == pytest.approx((3 * (1 - comb(2, 2) / comb(5, 2)) + 0) / 4)
    assert "pass@4" not in ov  # the last prompt has n = 2
    p0 = report["prompts"][0]
    assert (p0["n"], p0["passed"], p0["kept"], p0["ineligible"]) == (5, 3, 1, 2)
    assert p0["pass@4"] == pytest.approx(1.0) and p0["kept_fraction"] == pytest.approx(0.2)


def test_without_dedup_the_duplicates_stay_and_reruns_are_skipped(tmp_path):
    src = _write_generations(tmp_path / "g.jsonl", _rows())
    out = run_filter(_recipe(tmp_path, src, "keep=all", "dedup=false", "drop_truncated=false"))
    assert len(load_records(out)) == 9  # every passing completion: right, its copy, the truncated one
    mtime = out.stat().st_mtime_ns
    assert run_filter(_recipe(tmp_path, src, "keep=all", "dedup=false", "drop_truncated=false")) == out
    assert out.stat().st_mtime_ns == mtime  # same input and settings: skipped
    run_filter(_recipe(tmp_path, src, "keep=best"))
    assert len(load_records(out)) == 3  # other settings: redone


def test_a_repeated_prompt_does_not_repeat_its_kept_response(tmp_path):
    rows = _rows()[:1]
    rows.append({**rows[0], "index": 1})
    out = run_filter(_recipe(tmp_path, _write_generations(tmp_path / "g.jsonl", rows), "keep=all"))
    assert [r.data["metadata"]["generation_index"] for r in load_records(out)] == [0]


def test_nothing_passing_stops_with_the_report_and_no_file(tmp_path):
    rows = [r for r in _rows() if r["index"] == 3]
    with pytest.raises(DataError, match="kept nothing: 0 of 2 completions of 1 prompts") as err:
        run_filter(_recipe(tmp_path, _write_generations(tmp_path / "g.jsonl", rows)))
    assert "filter_report.json" in err.value.render()
    assert (tmp_path / "f" / "filter_report.json").is_file()
    assert not (tmp_path / "f" / "sft.jsonl").exists()


def test_unknown_reward_is_a_config_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'format'") as err:
        _recipe(tmp_path, "x.jsonl", "rewards=[{name: formt}]")
    assert "rewards[0].name" in err.value.render()


def test_generate_inside_filter_with_a_registered_reward(tmp_path, tiny_model_dir):
    from posttrain.rewards.registry import register_reward

    @register_reward("test_even_length", replace=True)
    def even(prompts, completions, metadata):
        return [float(len(c) % 2 == 0) for c in completions]

    recipe = load_recipe(
        FilterRecipe, None,
        [f"output_dir={tmp_path / 'f'}", f"generate.model.path={tiny_model_dir}", "generate.data.n_per_level=2",
         "generate.data.levels=[1]", "generate.sampling.n=4", "generate.sampling.max_new_tokens=8",
         "rewards=[{name: test_even_length}]", "keep=all", "dedup=false", "drop_truncated=false"],
    )  # fmt: skip
    out = run_filter(recipe)
    gens = [json.loads(line) for line in (tmp_path / "f" / "generate" / "generations.jsonl").open()]
    expected = [
        (r["index"], i)
        for r in gens
        for i, c in enumerate(r["completions"])
        if len(c["text"]) % 2 == 0 and c["text"].strip()
    ]
    got = [
        (r.data["metadata"]["generation_index"], r.data["metadata"]["sample_index"])
        for r in load_records(out)
    ]
    assert got == expected and expected


def test_the_output_trains_one_sft_step(tmp_path, tiny_model_dir):
    from posttrain.train.sft import SFTRecipe, run_sft

    out = run_filter(_recipe(tmp_path, _write_generations(tmp_path / "g.jsonl", _rows()), "keep=all"))
    sft = load_recipe(
        SFTRecipe, None,
        [f"model.path={tiny_model_dir}", f"data.train={out}", "data.eval=null", "train.max_steps=1",
         "train.batch_size=2", "train.seq_len=128", "data.max_len=128", f"output_dir={tmp_path / 'sft'}",
         "train.tensorboard=false"],
    )  # fmt: skip
    final = run_sft(sft)
    assert (final / "config.json").is_file()
    from safetensors.torch import load_file

    (step,) = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").open() if '"loss"' in line]
    assert 0 < step["loss"] < 100 and step["tokens"] > 0
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step trained on the kept records


def test_filter_command_line(tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    src = _write_generations(tmp_path / "g.jsonl", _rows())
    recipe = tmp_path / "filter.yaml"
    recipe.write_text(f"input: {src}\nkeep: best\n")
    result = CliRunner().invoke(app, ["filter", str(recipe), f"output_dir={tmp_path / 'c'}"])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and len(load_records(tmp_path / "c" / "sft.jsonl")) == 3
