"""Scorers by name: parsing, bad paths, majority and running aggregation by hand, oracle marking,
prompt files, and a trained PRM as ``prm:AGG:PATH``."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.search.protocols import ScoreRequest
from posttrain.search.report import StrategyRow, compute_ratios, format_markdown, html_page, svg_plot
from posttrain.search.scorer_specs import MajorityScorer, ScorerSpec, build_scorer, parse_scorer, running


def _folder(tmp_path, name: str, kind: str | None):
    d = tmp_path / name
    d.mkdir()
    if kind is not None:
        (d / "reward_head.json").write_text(json.dumps({"kind": kind, "hidden_size": 8}))
    return str(d)


def test_names_parse_and_bad_paths_are_config_errors(tmp_path):
    prm, orm, plain = (
        _folder(tmp_path, "p", "prm"),
        _folder(tmp_path, "o", "orm"),
        _folder(tmp_path, "x", None),
    )
    assert parse_scorer("verifier").oracle and parse_scorer("oracle_prm").oracle
    assert not parse_scorer("majority").oracle
    assert parse_scorer(f"prm:{prm}") == ScorerSpec("prm", prm, "min")
    assert parse_scorer(f"prm:last:{prm}") == ScorerSpec("prm", prm, "last")
    assert parse_scorer(f"value:{prm}").kind == "value" and parse_scorer(orm) == ScorerSpec("orm", orm)
    with pytest.raises(ConfigError, match="not a reward or value model") as exc:
        parse_scorer(f"prm:{plain}", "strategies[2].scorer")
    assert exc.value.where == "strategies[2].scorer"
    with pytest.raises(ConfigError, match="holds a prm model, not a orm"):
        parse_scorer(f"orm:{prm}")
    with pytest.raises(ConfigError, match="does not exist"):
        parse_scorer(f"value:{tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="unknown scorer"):
        parse_scorer("judge-of-nothing")


def test_running_aggregation_and_majority_by_hand():
    assert running([0.9, 0.5, 0.8], "min") == [0.9, 0.5, 0.5]
    assert running([0.9, 0.5, 0.8], "last") == [0.9, 0.5, 0.8]
    assert running([0.5, 0.5, 0.8], "product") == pytest.approx([0.5, 0.25, 0.2])
    assert running([0.9, 0.5, 0.7], "mean") == pytest.approx([0.9, 0.7, 0.7])
    texts = ["Answer: 3", "Answer: 3", "Answer: 4", "no answer"]
    reqs = [ScoreRequest("q1", ["a", "b"], t, True, {}) for t in texts]
    reqs += [
        ScoreRequest("q2", ["a"], "Answer: 4", True, {}),
        ScoreRequest("q2", ["a"], "<think>1", False, {}),
    ]
    assert MajorityScorer().score(reqs) == [[0.0, 0.5], [0.0, 0.5], [0.0, 0.25], [0.0, 0.0], [1.0], [0.0]]


def _row(label, strategy, acc, tokens, oracle=False):
    return StrategyRow(label, strategy, 10, round(10 * acc), int(10 * tokens), oracle=oracle)


def test_oracle_rows_are_labelled_banded_and_kept_out_of_learned_ratios():
    rows = [_row("bon4", "best_of_n", 0.9, 40, True), _row("bon8", "best_of_n", 1.0, 80, True),
            _row("greedy", "greedy", 0.3, 10), _row("prm_bon4", "best_of_n", 0.4, 40),
            _row("prm_bon8", "best_of_n", 0.6, 80), _row("co", "compute_optimal", 0.5, 30)]  # fmt: skip
    lines = format_markdown(rows).splitlines()
    labels = [line.split(" | ")[0][2:] for line in lines[2:8]]
    assert labels == ["greedy", "prm_bon4", "prm_bon8", "co", "*reference band: oracle scorers, upper bounds*",
                      "bon4 (oracle)"]  # fmt: skip
    (ratio,) = compute_ratios(rows)
    # the learned best-of-N curve (0.4 at 40, 0.6 at 80) reaches 0.5 at 60 tokens: 60 / 30 = 2
    assert ratio["baseline_tokens"] == pytest.approx(60.0) and ratio["ratio"] == pytest.approx(2.0)
    assert "stroke-dasharray" in svg_plot(rows) and "best_of_n (oracle)" in svg_plot(rows)
    assert "Reference band (oracle)" in html_page("t", "", rows)


def test_prompt_file_search_grades_with_the_records_scorer(tmp_path, tiny_model_dir):
    from posttrain.config import load_recipe
    from posttrain.search.compare import SearchRecipe, run_search_recipe
    from posttrain.search.prompt_files import load_prompt_problems

    lines = [{"prompt": "Compute 1 + 2", "metadata": {"scorer": "arith", "ground_truth": "3", "level": 1}},
             {"prompt": [{"role": "user", "content": "2+2?"}], "metadata": {"scorer": "math", "ground_truth": "4"}}]  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    probs = load_prompt_problems(str(path))
    assert [p.task for p in probs] == ["arith", "math"] and probs[1].question == "2+2?"
    assert probs[0].verify("<think>1 + 2 = 3</think>\nAnswer: 3") and not probs[0].verify("Answer: 4")
    assert probs[1].verify("Answer: 4") and not probs[1].verify("Answer: 5")
    out = tmp_path / "run"
    keys = [f"model.path={tiny_model_dir}", f"prompts={path}", f"output_dir={out}", "scorer=majority",
            "strategies=[{name: greedy, config: {step: {max_new_tokens: 6}}}, "
            "{name: best_of_n, config: {n: 2, select: prm_last, step: {max_new_tokens: 6}}}]"]  # fmt: skip
    run_search_recipe(load_recipe(SearchRecipe, None, keys))
    data = json.loads((out / "results.json").read_text())
    assert [r["n"] for r in data["rows"]] == [2, 2] and set(data["rows"][1]["by_level"]) == {
        "arith/L1",
        "math/L1",
    }
    assert not any(r["oracle"] for r in data["rows"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "metadata": {"ground_truth": "1"}}) + "\n")
    with pytest.raises(DataError, match="metadata.scorer"):
        load_prompt_problems(str(bad))


def test_a_trained_prm_scores_by_name_with_its_aggregation(tmp_path, tiny_model_dir):
    from posttrain.config import load_recipe
    from posttrain.search.compare import SearchRecipe
    from posttrain.train.prm import PRMRecipe, run_prm

    keys = {"model.path": tiny_model_dir, "output_dir": tmp_path / "prm", "data.tasks": "[sort]",
            "data.n_per_level": 2, "data.levels": "[1]", "data.eval": "null", "train.max_steps": 1,
            "train.batch_size": 2, "train.tensorboard": "false", "eval_before": "false"}  # fmt: skip
    final = str(run_prm(load_recipe(PRMRecipe, None, [f"{k}={v}" for k, v in keys.items()])))
    reqs = [ScoreRequest("Sort 3 1 2\n", ["1 3", "1 2 3"], "<think>1 3<step>1 2 3</think>\nAnswer: 1 2 3", True,
                         {"question": "Sort 3 1 2"})]  # fmt: skip
    raw = build_scorer(parse_scorer(f"prm:last:{final}")).score(reqs)[0]
    assert build_scorer(parse_scorer(f"prm:{final}")).score(reqs)[0] == running(raw, "min")
    assert len(raw) == 2 and all(0.0 < p < 1.0 for p in raw)
    with pytest.raises(ConfigError, match="not a orm"):
        load_recipe(SearchRecipe, None, [f"scorer=orm:{final}"])


def test_a_ppo_critic_scores_as_value_path_batched_like_one_by_one(tmp_path, tiny_model_dir):
    import shutil

    from transformers import AutoConfig

    from posttrain.models.heads import ScalarHead, save_value_head
    from posttrain.search.scorer_specs import CriticScorer

    folder = tmp_path / "ppo_final"
    shutil.copytree(tiny_model_dir, folder)
    save_value_head(ScalarHead(AutoConfig.from_pretrained(folder).hidden_size, seed=3), folder)
    spec = parse_scorer(f"value:{folder}")
    assert spec.kind == "value" and parse_scorer(str(folder)).kind == "value"
    scorer = build_scorer(spec)
    assert isinstance(scorer, CriticScorer)
    reqs = [ScoreRequest("Compute 1 + 2\n", ["a", "b"], "<think>1 + 2 = 3</think>\nAnswer: 3", True, {}),
            ScoreRequest("Sort 2 1\n", ["a"], "<think>1 2", False, {}),
            ScoreRequest("Q\n", [], "", False, {})]  # fmt: skip
    together = scorer.score(reqs)
    alone = [scorer.score([r])[0] for r in reqs]
    assert [len(x) for x in together] == [2, 1, 1] and together[0][0] == 0.0
    assert [x[-1] for x in together] == pytest.approx([x[-1] for x in alone], abs=1e-5)
    assert len({round(x[-1], 6) for x in together}) == 3  # the value depends on the path
