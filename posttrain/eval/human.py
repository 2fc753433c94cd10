"""Human evaluation: export a side-by-side rating sheet, import the filled CSV, agree with the judge.

`export_sheet` reads an eval run directory. With a ``judge.jsonl`` from a pairwise judge it
writes a pairwise sheet (question, response A, response B; the rater fills ``preference`` with
A, B or tie); the candidate's side is drawn at random per item (seeded) so raters cannot learn a
position, and recorded in ``sheet_key.json`` -- not in the sheet. With a pointwise
``judge.jsonl``, or none (then the first decoding's first sample of each problem), it writes a
pointwise sheet (question, response; the rater fills ``rating``: 1-10, or pass / fail). Both as
``sheet.csv`` and ``sheet.html``: one self-contained page (inline CSS and JS, no network) whose
"Download CSV" button saves the same CSV with the ratings filled in.

`import_ratings` reads the filled CSV (``item_id`` and ``preference`` or ``rating``; other
columns are ignored) and the key beside it. An empty or invalid rating is a DataError naming
``file:line``. It reports, with 95% bootstrap intervals, the candidate's human win rate (win 1,
tie 0.5, loss 0) and win / tie / loss fractions, or the mean rating / pass rate; and, where the
LLM judge rated the same items (unparsable verdicts left out), Cohen's kappa between human and
judge labels (`cohens_kappa`; pairwise labels win / tie / loss, pointwise the score or pass/fail,
unweighted) and their raw agreement.
"""

from __future__ import annotations

import csv
import html
import json
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.eval.metrics import mean_with_ci
from posttrain.eval.results import write_atomic


def cohens_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels of the same items: (p_o - p_e) / (1 - p_e), with p_o
    the fraction of items they label alike and p_e = sum_k p_a(k) p_b(k) the agreement expected
    by chance from each rater's label frequencies. 1.0 when both give one and the same label to
    every item (p_e = 1); NaN for no items."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs paired labels, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if p_e == 1.0:
        return 1.0
    return (p_o - p_e) / (1 - p_e)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def sheet_items(run_dir: Path, seed: int = 0) -> tuple[str, list[dict]]:
    """``(mode, items)`` to rate from an eval run (module docstring); each item has ``item_id``,
    ``question``, the shown response(s), and the key fields (``candidate_side``, ``judge``)."""
    judge = run_dir / "judge.jsonl"
    if judge.is_file():
        rows = _read_jsonl(judge)
        if rows and "baseline" in rows[0]:
            rng = random.Random(seed)
            items = []
            for n, r in enumerate(rows):
                side = rng.choice("AB")
                a, b = (r["candidate"], r["baseline"]) if side == "A" else (r["baseline"], r["candidate"])
                judged = None if r["outcome"] == "unparsable" else r["outcome"]
                items.append({"item_id": f"p{n + 1}", "question": r["question"], "response_a": a,
                              "response_b": b, "candidate_side": side, "judge": judged, "where": r["where"]})  # fmt: skip
            return "pairwise", items
        items = [{"item_id": f"p{n + 1}", "question": r["question"], "response": r["candidate"],
                  "judge": r["score"], "where": r["where"]} for n, r in enumerate(rows)]  # fmt: skip
        return "pointwise", items
    results = run_dir / "results.json"
    if not results.is_file():
        raise DataError("no judge.jsonl or results.json here", where=str(run_dir),
                        fix="point at the output_dir of a `posttrain eval` run")  # fmt: skip
    items = []
    for n, p in enumerate(json.loads(results.read_text(encoding="utf-8"))["problems"]):
        run = next(iter(p["decodings"].values()))
        items.append({"item_id": f"p{n + 1}", "question": p["question"], "response": run["samples"][0]["text"],
                      "judge": None, "where": p["where"]})  # fmt: skip
    return "pointwise", items


def _columns(mode: str) -> list[str]:
    return ["item_id", "question", "response_a", "response_b", "preference"] if mode == "pairwise" \
        else ["item_id", "question", "response", "rating"]  # fmt: skip


def export_sheet(
    run_dir: str | Path, out_dir: str | Path | None = None, seed: int = 0, scale: str = "1-10"
) -> Path:
    """Write ``sheet.csv``, ``sheet.html`` and ``sheet_key.json`` (default: ``RUN_DIR/human/``);
    returns the CSV's path. ``scale`` (pointwise): ``1-10`` or ``pass_fail``."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "human"
    mode, items = sheet_items(run_dir, seed)
    cols = _columns(mode)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sheet.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([[it.get(c, "") for c in cols] for it in items])
    key = {"mode": mode, "scale": scale, "run_dir": str(run_dir),
           "items": {it["item_id"]: {k: it.get(k) for k in ("candidate_side", "judge", "where")} for it in items}}  # fmt: skip
    write_atomic(out / "sheet_key.json", json.dumps(key, indent=1))
    write_atomic(out / "sheet.html", sheet_html(mode, items, cols, scale))
    return out / "sheet.csv"


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}.item{border:1px solid #ccc;
border-radius:6px;padding:1em;margin:1em 0}.pair{display:flex;gap:1em}.pair>div{flex:1}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.6em;border-radius:4px}label{margin-right:1em}"""

_JS = """function csvCell(s){s=String(s);return /[",\\n\\r]/.test(s)?'"'+s.replace(/"/g,'""')+'"':s}
function download(){const rows=[COLS.join(',')];let missing=0;for(const it of ITEMS){
const c=document.querySelector('input[name="'+it.item_id+'"]:checked');if(!c)missing++;
it[RATING]=c?c.value:'';rows.push(COLS.map(k=>csvCell(it[k]||'')).join(','))}
if(missing&&!confirm(missing+' item(s) not rated yet; download anyway?'))return;
const a=document.createElement('a');a.href=URL.createObjectURL(new Blob([rows.join('\\r\\n')+'\\r\\n'],
{type:'text/csv'}));a.download='sheet.csv';a.click()}"""


def sheet_html(mode: str, items: list[dict], cols: list[str], scale: str) -> str:
    """The self-contained rating page (module docstring)."""
    e = html.escape
    if mode == "pairwise":
        choices, rating = ["A", "B", "tie"], "preference"
        intro = "Which response answers the request better? Choose A, B or tie."
    else:
        choices, rating = (
            (["pass", "fail"] if scale == "pass_fail" else [str(i) for i in range(1, 11)]),
            "rating",
        )
        intro = "Rate each response: " + (
            "pass or fail." if scale == "pass_fail" else "1 (bad) to 10 (excellent)."
        )
    cards = []
    for it in items:
        body = (f'<div class="pair"><div><b>A</b><pre>{e(it["response_a"])}</pre></div>'
                f'<div><b>B</b><pre>{e(it["response_b"])}</pre></div></div>') if mode == "pairwise" \
            else f'<pre>{e(it["response"])}</pre>'  # fmt: skip
        radios = "".join(f'<label><input type="radio" name="{e(it["item_id"])}" value="{c}"> {c}</label>'
                         for c in choices)  # fmt: skip
        cards.append(f'<div class="item"><b>{e(it["item_id"])}</b><pre>{e(it["question"])}</pre>{body}'
                     f"<div>{radios}</div></div>")  # fmt: skip
    data = json.dumps([{c: it.get(c, "") for c in cols} for it in items]).replace("<", "\\u003c")
    script = f"const ITEMS={data};const COLS={json.dumps(cols)};const RATING={json.dumps(rating)};{_JS}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>posttrain {mode} rating</title>"
            f"<style>{_CSS}</style></head><body><h1>{mode.capitalize()} rating ({len(items)} items)</h1>"
            f"<p>{e(intro)} Then press <button onclick='download()'>Download CSV</button> and send the file "
            f"back.</p>{''.join(cards)}<p><button onclick='download()'>Download CSV</button></p>"
            f"<script>{script}</script></body></html>\n")  # fmt: skip


def read_ratings(csv_path: Path, mode: str, scale: str) -> dict[str, Any]:
    """``item_id -> label`` of a filled sheet: pairwise ``A|B|tie``, pointwise a float (1-10) or
    1.0 / 0.0 (pass / fail); an empty or invalid rating is a DataError at ``file:line``."""
    col = "preference" if mode == "pairwise" else "rating"
    out: dict[str, Any] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "item_id" not in reader.fieldnames or col not in reader.fieldnames:
            raise DataError(f"the sheet needs the columns item_id and {col}", where=f"{csv_path}:1",
                            fix="fill the exported sheet.csv without renaming its header")  # fmt: skip
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            value = (row.get(col) or "").strip()
            if not value:
                raise DataError(f"item {row.get('item_id')!r} has no {col}", where=where,
                                fix=f"fill in every {col} ({_allowed(mode, scale)})")  # fmt: skip
            out[row["item_id"]] = _label(value, mode, scale, where)
    return out


def _allowed(mode: str, scale: str) -> str:
    return "A, B or tie" if mode == "pairwise" else ("pass or fail" if scale == "pass_fail" else "1 to 10")


def _label(value: str, mode: str, scale: str, where: str) -> Any:
    v = value.lower()
    if mode == "pairwise" and v in ("a", "b", "tie"):
        return "tie" if v == "tie" else v.upper()
    if mode == "pointwise" and scale == "pass_fail" and v in ("pass", "fail"):
        return float(v == "pass")
    if mode == "pointwise" and scale != "pass_fail":
        try:
            x = float(v)
        except ValueError:
            x = 0.0
        if 1 <= x <= 10:
            return x
    raise DataError(f"invalid rating {value!r}", where=where, fix=f"use {_allowed(mode, scale)}")


def import_ratings(csv_path: str | Path, key_path: str | Path | None = None, n_boot: int = 1000) -> Path:
    """Score a filled sheet against its key (module docstring); writes and returns
    ``human_results.json`` beside the CSV."""
    csv_path = Path(csv_path)
    key_file = Path(key_path) if key_path else csv_path.with_name("sheet_key.json")
    if not key_file.is_file():
        raise DataError("no sheet_key.json beside the CSV", where=str(key_file),
                        fix="keep the CSV in the folder export_sheet wrote, or pass the key's path")  # fmt: skip
    key = json.loads(key_file.read_text(encoding="utf-8"))
    mode, scale, items = key["mode"], key.get("scale", "1-10"), key["items"]
    ratings = read_ratings(csv_path, mode, scale)
    unknown = sorted(set(ratings) - set(items))
    if unknown:
        raise DataError(
            f"item ids not in the key: {unknown[:5]}", where=str(csv_path), fix="rate the exported items"
        )
    ids = [i for i in items if i in ratings]
    if mode == "pairwise":
        human = [{"tie": "tie", items[i]["candidate_side"]: "win"}.get(ratings[i], "loss") for i in ids]
        value = {"win": 1.0, "tie": 0.5, "loss": 0.0}
        metrics = {"win_rate": mean_with_ci([value[h] for h in human], n_boot)}
        metrics.update(
            {f"{o}s": mean_with_ci([float(h == o) for h in human], n_boot) for o in ("win", "tie")}
        )
        metrics["losses"] = mean_with_ci([float(h == "loss") for h in human], n_boot)
    else:
        human = [ratings[i] for i in ids]
        metrics = {"pass_rate" if scale == "pass_fail" else "rating": mean_with_ci(human, n_boot)}
    both = [
        (h, items[i]["judge"]) for h, i in zip(human, ids, strict=True) if items[i].get("judge") is not None
    ]
    agree = {"items": len(both)}
    if both:
        agree.update(kappa=cohens_kappa([h for h, _ in both], [j for _, j in both]),
                     raw_agreement=sum(h == j for h, j in both) / len(both))  # fmt: skip
    out = {"mode": mode, "scale": scale, "rated": len(ids), "of": len(items), "metrics": metrics,
           "agreement_with_judge": agree}  # fmt: skip
    path = csv_path.with_name("human_results.json")
    write_atomic(path, json.dumps(out, indent=1))
    return path


def human_command(action: str, path: str, out: str | None = None, scale: str = "1-10", seed: int = 0) -> Path:
    """``posttrain human-eval export RUN_DIR`` / ``posttrain human-eval import SHEET.csv``."""
    from posttrain.errors import ConfigError

    if action == "export":
        sheet = export_sheet(path, out, seed=seed, scale=scale)
        print(f"rating sheet: {sheet.with_suffix('.html')} (open in a browser) and {sheet}; key: "
              f"{sheet.with_name('sheet_key.json')}")  # fmt: skip
        return sheet
    if action == "import":
        res_path = import_ratings(path)
        res = json.loads(res_path.read_text())
        for name, m in res["metrics"].items():
            print(f"{name}: {m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}] (n={m['n']})")
        agree = res["agreement_with_judge"]
        if agree.get("items"):
            print(f"vs the LLM judge on {agree['items']} items: Cohen's kappa {agree['kappa']:.3f}, "
                  f"raw agreement {agree['raw_agreement']:.3f}")  # fmt: skip
        print(f"results: {res_path}")
        return res_path
    raise ConfigError(f"unknown action {action!r}", where="human-eval", fix="use export or import")
