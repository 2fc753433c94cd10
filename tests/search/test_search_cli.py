"""`posttrain search RECIPE.yaml`: recipe errors name the key; a tiny-model run writes the table,
results.json, the SVG plot, the HTML page and reloadable traces; `strategy_table` for the quickstart."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import yaml

from posttrain.config import from_dict
from posttrain.errors import ConfigError
from posttrain.search.compare import SearchRecipe, quickstart_strategies, strategy_table
from posttrain.search.report import format_markdown
from posttrain.search.traces import load_results


def recipe(**over):
    return from_dict(SearchRecipe, over)


@pytest.mark.parametrize(
    "raw, where, text",
    [
        ({"strategies": [{"name": "greedy"}, {"name": "mtcs"}]}, "strategies[1].name", "did you mean 'mcts'"),
        (
            {"strategies": [{"name": "beam", "config": {"beam_widht": 2}}]},
            "strategies[0].config",
            "beam_widht",
        ),
        ({"scorer": "none", "strategies": [{"name": "beam"}]}, "strategies[0]", "needs a scorer"),
        (
            {"scorer": "none", "strategies": [{"name": "best_of_n", "config": {"select": "verifier"}}]},
            "strategies[0]",
            "needs a scorer",
        ),  # fmt: skip
        ({"scorer": "none", "strategies": [{"name": "compute_optimal"}]}, "strategies[0]", "needs a scorer"),
        ({"scorer": "my_prm"}, "scorer", "unknown scorer"),
        (
            {"strategies": [{"name": "greedy"}, {"name": "greedy"}]},
            "strategies[1].label",
            "labelled 'greedy'",
        ),
        (
            {"strategies": [{"name": "greedy", "budget": {}, "config": {"budget": {}}}]},
            "strategies[0].budget",
            "twice",
        ),  # fmt: skip
    ],
)
def test_bad_recipes_name_the_key(raw, where, text):
    with pytest.raises(ConfigError) as err:
        recipe(**raw)
    assert err.value.where == where and text in err.value.render()


def test_recipe_defaults_and_budget():
    r = recipe(scorer="none", strategies=[{"name": "best_of_n", "config": {"select": "majority", "n": 2},
                                           "budget": {"max_generated_tokens": 50}}])  # fmt: skip
    from posttrain.search.compare import strategy_config

    cfg = strategy_config(r.strategies[0])
    assert (
        cfg.n == 2
        and cfg.budget.max_generated_tokens == 50
        and r.strategies[0].title() == ("best_of_n(select=majority,n=2)")
    )
    assert all(strategy_config(s) for s in quickstart_strategies(n=4))  # every config parses strictly
    assert [s.title() for s in quickstart_strategies()] == ["greedy", "self_consistency(n=8)", "best_of_n(n=4)",
        "best_of_n(n=8)", "prm_beam", "prm_mcts", "compute_optimal"]  # fmt: skip


def test_cli_runs_a_recipe_on_the_tiny_model(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    out = tmp_path / "run"
    step = {"max_new_tokens": 12, "max_step_tokens": 6, "max_depth": 2}
    raw = {
        "model": {"path": str(tiny_model_dir)},
        "tasks": {"tasks": ["arith"], "levels": [1], "n_per_level": 3},
        "strategies": [
            {"name": "greedy", "config": {"step": step}},
            {"name": "best_of_n", "config": {"n": 2, "select": "verifier", "step": step}},
            {
                "name": "compute_optimal",
                "config": {
                    "probe_n": 2,
                    "step": step,
                    "edges": [0.5],
                    "bins": [
                        {"strategy": "probe"},
                        {"strategy": "best_of_n", "config": {"n": 2, "select": "verifier"}},
                    ],
                },
            },
        ],  # fmt: skip
        "calibration": {"n_per_level": 1, "max_tokens": 1000},
        "output_dir": str(out),
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["search", str(path), "seed=1"])
    assert res.exit_code == 0, res.output
    assert "acc %" in res.output and "best_of_n(n=2,select=verifier)" in res.output
    data = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["greedy", "best_of_n(n=2,select=verifier)",
                                                  "compute_optimal(probe_n=2)"]  # fmt: skip
    greedy, bon, co = data["rows"]
    assert all(r["n"] == 3 and 0 <= r["correct"] <= 3 for r in data["rows"])
    assert 0 < greedy["generated_tokens"] <= 3 * 12 and bon["generated_tokens"] <= 2 * 3 * 12
    assert co["extra"]["probe_tokens"] <= co["generated_tokens"] and sum(co["extra"]["bins"].values()) == 3
    assert list(data["calibration"]) == ["compute_optimal(probe_n=2)"]
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    assert len(ET.parse(out / "plot.svg").getroot().findall("{http://www.w3.org/2000/svg}circle")) == 3
    assert "<svg" in (out / "results.html").read_text()
    traces = load_results(out / "traces" / "compute_optimal_probe_n=2_.jsonl")
    assert sum(r.cost.generated_tokens for r in traces) == co["generated_tokens"]


def test_strategy_table_for_the_quickstart(tiny_model_dir):
    from posttrain.data.tasks import make_split

    problems = make_split("arith", "test", 2, levels=[1])
    step = {"max_new_tokens": 10}
    specs = [{"name": "greedy", "config": {"step": step}},
             {"name": "beam", "label": "prm_beam", "scorer": "oracle_prm",
              "config": {"beam_width": 1, "expand_k": 2, "step": {"max_step_tokens": 5, "max_depth": 2}}}]  # fmt: skip
    rows = strategy_table(str(tiny_model_dir), problems, specs, scorer="none")
    assert [r.label for r in rows] == ["greedy", "prm_beam"] and all(r.n == 2 for r in rows)
    assert rows[0].generated_tokens <= 2 * 10 and rows[1].scorer_calls >= 2
    assert [r.oracle for r in rows] == [False, True]  # beam selects with the oracle step checker
    table = format_markdown(rows).splitlines()
    assert table[2].startswith("| greedy |") and "reference band" in table[3]
    assert table[4].startswith("| prm_beam (oracle) |") and "upper bounds" in table[-1]


def test_cli_bad_strategy_is_one_paragraph(tmp_path, monkeypatch, capsys):
    import sys

    from posttrain.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("scorer: none\nstrategies:\n  - name: greedy\n  - name: beam\n")
    monkeypatch.setattr(sys, "argv", ["posttrain", "search", str(path)])
    monkeypatch.delenv("POSTTRAIN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "strategies[1]" in err and "Fix: set scorer" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
