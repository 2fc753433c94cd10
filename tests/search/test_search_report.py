"""Strategy-comparison reports: matched-compute ratios by hand, the markdown table, the SVG plot."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from posttrain.search.report import (
    StrategyRow,
    compute_ratios,
    format_markdown,
    html_page,
    svg_plot,
    tokens_at_accuracy,
)

SVG = "{http://www.w3.org/2000/svg}"


def rows() -> list[StrategyRow]:
    return [
        StrategyRow("greedy", "greedy", 10, 2, 300),
        StrategyRow("bon4", "best_of_n", 10, 4, 1000),
        StrategyRow("bon8", "best_of_n", 10, 8, 2000),
        StrategyRow("co", "compute_optimal", 10, 6, 500, policy_calls=15, scorer_calls=10, seconds=1.25),
    ]


def test_tokens_at_accuracy_interpolates_inside_the_curve_only():
    curve = [(200.0, 0.8), (100.0, 0.4)]  # unsorted on purpose
    assert tokens_at_accuracy(curve, 0.6) == pytest.approx(150.0)
    assert tokens_at_accuracy(curve, 0.8) == 200.0 and tokens_at_accuracy(curve, 0.4) == 100.0
    assert tokens_at_accuracy(curve, 0.9) is None  # never reached
    assert tokens_at_accuracy(curve, 0.2) is None  # below the cheapest point: no honest estimate


def test_compute_ratio_against_best_of_n():
    [r] = compute_ratios(rows())
    # best_of_n: 40% at 100 tokens/problem, 80% at 200 -> 60% at 150; compute_optimal spends 50
    assert (r["label"], r["accuracy"], r["tokens"]) == ("co", 0.6, 50.0)
    assert r["baseline_tokens"] == pytest.approx(150.0) and r["ratio"] == pytest.approx(3.0)
    assert compute_ratios(rows()[:1]) == []


def test_markdown_table():
    text = format_markdown(rows(), compute_ratios(rows()))
    lines = text.splitlines()
    assert lines[0].startswith("| strategy | acc % |") and len([x for x in lines if x.startswith("| ")]) == 5
    assert "| co | 60.0 | 6/10 | 50.0 | 500 | 1.5 | 10 | 1.2 |" in lines
    assert "= 3.00 (> 1: co is cheaper)" in lines[-1]


def test_svg_plot_places_points_by_accuracy_and_tokens():
    svg = svg_plot(rows(), "t & <x>")
    root = ET.fromstring(svg)  # well-formed XML, title escaped
    circles = root.findall(f"{SVG}circle")
    assert len(circles) == 4
    pos = {
        c.find(f"{SVG}title").text.split(":")[0]: (float(c.get("cx")), float(c.get("cy"))) for c in circles
    }
    assert pos["greedy"][0] < pos["co"][0] < pos["bon4"][0] < pos["bon8"][0]  # more tokens: further right
    assert pos["bon8"][1] < pos["co"][1] < pos["bon4"][1] < pos["greedy"][1]  # more accurate: higher
    # log axis: 100 -> 200 tokens spans the same width as 50 -> 100
    assert pos["bon8"][0] - pos["bon4"][0] == pytest.approx(pos["bon4"][0] - pos["co"][0], abs=0.2)
    [line] = root.findall(f"{SVG}polyline")  # only best_of_n has two budgets
    assert len(line.get("points").split()) == 2
    page = html_page("t", svg, rows())
    assert page.count("<svg") == 1 and page.count("<tr>") == 5


def test_ratio_lower_bound_when_the_target_beats_every_baseline_point():
    better = StrategyRow(
        "co", "compute_optimal", 10, 9, 500
    )  # 90% at 50 tokens; best_of_n peaks at 80% / 200
    [r] = compute_ratios(rows()[:3] + [better])
    assert r["ratio"] is None and r["ratio_at_least"] == pytest.approx(4.0)
    assert r["baseline_best"] == {"tokens": 200.0, "accuracy": 0.8}
    assert "compute >= 4.00" in format_markdown([better], [r])
    [worse] = compute_ratios(rows()[1:3] + [StrategyRow("co", "compute_optimal", 10, 1, 500)])
    assert worse["ratio"] is None and worse["ratio_at_least"] is None  # below the curve: nothing to say


def test_series_split_lines():
    two = [StrategyRow("a", "compute_optimal", 10, 3, 100, series="a"),
           StrategyRow("b", "compute_optimal", 10, 5, 300, series="b")]  # fmt: skip
    root = ET.fromstring(svg_plot(two + rows()[1:3]))
    assert len(root.findall(f"{SVG}polyline")) == 1  # best_of_n only: a and b are separate series
    legend = [t.text for t in root.findall(f"{SVG}text")]
    assert {"a", "b", "best_of_n"} <= set(legend)
