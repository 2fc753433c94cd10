"""Human evaluation: sheet export, the filled-CSV round trip, Cohen's kappa, missing ratings."""

from __future__ import annotations

import csv
import json

import pytest

from posttrain.errors import DataError
from posttrain.eval.data import EvalDataConfig
from posttrain.eval.human import cohens_kappa, export_sheet, import_ratings
from posttrain.eval.runner import EvalRecipe, run_eval


def test_cohens_kappa_by_hand():
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15 (the textbook example):
    # p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4
    a = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    assert cohens_kappa(["w", "l", "t"], ["w", "l", "t"]) == pytest.approx(1.0)
    assert cohens_kappa(["w", "w"], ["w", "w"]) == 1.0  # one shared label: p_e = 1
    assert cohens_kappa(["w", "l"], ["l", "w"]) == pytest.approx(-1.0)


JUDGED = [  # a pairwise judge.jsonl as `posttrain eval` writes it
    {"index": i, "where": f"q.jsonl:{i + 1}", "question": f"Q{i} <b>?</b>", "candidate": f"cand {i}",
     "baseline": f"base {i}", "outcome": o, "consistent": o != "tie", "verdict_ab": "", "verdict_ba": ""}
    for i, o in enumerate(["win", "win", "loss", "tie", "unparsable"])
]  # fmt: skip


def fill(csv_path, choose) -> None:
    rows = list(csv.DictReader(csv_path.read_text(encoding="utf-8").splitlines()))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **choose(r)})


def test_pairwise_round_trip_win_rate_and_kappa(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JUDGED))
    sheet = export_sheet(run, seed=3)
    key = json.loads((sheet.parent / "sheet_key.json").read_text())
    header = next(csv.reader(sheet.read_text(encoding="utf-8").splitlines()))
    assert header == ["item_id", "question", "response_a", "response_b", "preference"]  # no side in the sheet
    sides = [key["items"][f"p{i + 1}"]["candidate_side"] for i in range(5)]
    assert set(sides) == {"A", "B"}  # the candidate is not always on one side
    page = (sheet.parent / "sheet.html").read_text()
    assert "Q0 &lt;b&gt;?&lt;/b&gt;" in page and "<b>?</b>" not in page.split("<script>")[0]
    assert "http" not in page  # self-contained
    # the human: candidate wins p1, p2, p5; tie on p4; baseline wins p3
    human = {"p1": "win", "p2": "win", "p3": "loss", "p4": "tie", "p5": "win"}
    other = {"A": "B", "B": "A"}

    def choose(r):
        side = key["items"][r["item_id"]]["candidate_side"]
        h = human[r["item_id"]]
        return {"preference": "tie" if h == "tie" else (side if h == "win" else other[side])}

    fill(sheet, choose)
    res = json.loads(import_ratings(sheet).read_text())
    m = res["metrics"]
    assert m["win_rate"]["value"] == pytest.approx((3 + 0.5) / 5) and m["win_rate"]["n"] == 5
    assert m["wins"]["value"] == pytest.approx(0.6) and m["losses"]["value"] == pytest.approx(0.2)
    # vs the judge on its 4 parsed items: human win win loss tie, judge win win loss tie -> 1.0
    assert res["agreement_with_judge"] == {"items": 4, "kappa": pytest.approx(1.0), "raw_agreement": 1.0}


def test_pairwise_kappa_when_human_and_judge_differ(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JUDGED))
    sheet = export_sheet(run)
    key = json.loads((sheet.parent / "sheet_key.json").read_text())
    fill(
        sheet, lambda r: {"preference": key["items"][r["item_id"]]["candidate_side"]}
    )  # always the candidate
    res = json.loads(import_ratings(sheet).read_text())
    # human: win x4 on the judged items; judge: win win loss tie. p_o = 2/4; p_e = (4*2)/16 = 0.5 -> 0
    assert res["agreement_with_judge"]["kappa"] == pytest.approx(0.0)
    assert res["metrics"]["win_rate"]["value"] == 1.0


def test_missing_rating_names_file_and_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JUDGED))
    sheet = export_sheet(run)
    fill(sheet, lambda r: {"preference": "" if r["item_id"] == "p2" else "tie"})
    with pytest.raises(DataError, match=r"item 'p2' has no preference") as err:
        import_ratings(sheet)
    assert err.value.where == f"{sheet}:3"  # header is line 1, p1 line 2
    fill(sheet, lambda r: {"preference": "maybe" if r["item_id"] == "p2" else "tie"})
    with pytest.raises(DataError, match="invalid rating 'maybe'"):
        import_ratings(sheet)


def test_pointwise_sheet_from_results_without_a_judge(tmp_path):
    data = tmp_path / "q.jsonl"
    rows = [{"prompt": f"What is {i}+1?", "metadata": {"scorer": "math", "ground_truth": str(i + 1)},
             "reference": f"Answer: {i + 1}"} for i in range(3)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_eval(EvalRecipe(data=[EvalDataConfig(path=str(data))], reference=True, output_dir=str(out)))
    sheet = export_sheet(out, scale="1-10")
    assert next(csv.reader(sheet.read_text(encoding="utf-8").splitlines())) == [
        "item_id",
        "question",
        "response",
        "rating",
    ]
    fill(sheet, lambda r: {"rating": {"p1": "8", "p2": "6", "p3": "10"}[r["item_id"]]})
    res = json.loads(import_ratings(sheet).read_text())
    assert res["metrics"]["rating"]["value"] == pytest.approx(8.0)
    assert res["agreement_with_judge"] == {"items": 0}
    fill(sheet, lambda r: {"rating": "11"})
    with pytest.raises(DataError, match="1 to 10"):
        import_ratings(sheet)


def test_cli_export_and_import(tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JUDGED))
    res = CliRunner().invoke(app, ["human-eval", "export", str(run), "--out", str(tmp_path / "sheet")])
    assert res.exit_code == 0, res.output
    sheet = tmp_path / "sheet" / "sheet.csv"
    fill(sheet, lambda r: {"preference": "tie"})
    res = CliRunner().invoke(app, ["human-eval", "import", str(sheet)])
    assert res.exit_code == 0, res.output
    assert "win_rate: 0.500" in res.output and "Cohen's kappa" in res.output
