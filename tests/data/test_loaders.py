"""Loaders: every format round-trips; every bad file names the file and line or row."""

from __future__ import annotations

import gzip
import json

import pytest

from posttrain.data.loaders import load_records, write_jsonl
from posttrain.errors import DataError

ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5", "reasoning_content": "add"},
        ]
    },
    {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}]},
]


def _datas(records):
    return [r.data for r in records]


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "d.jsonl"
    assert write_jsonl(path, ROWS) == 3
    records = load_records(path)
    assert _datas(records) == ROWS
    assert [r.where for r in records] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert {r.kind for r in records} == {"chat"}
    assert _datas(load_records(path, limit=2)) == ROWS[:2]


def test_jsonl_blank_lines_keep_line_numbers_and_gzip(tmp_path):
    text = json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n"
    (tmp_path / "d.jsonl").write_text(text)
    assert [r.where.rsplit(":", 1)[1] for r in load_records(tmp_path / "d.jsonl")] == ["1", "4"]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(text)
    assert _datas(load_records(tmp_path / "d.jsonl.gz")) == ROWS[:2]


def test_json_list_and_data_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    for name in ("a.json", "b.json"):
        records = load_records(tmp_path / name)
        assert _datas(records) == ROWS
        assert records[2].where == f"{tmp_path / name}:row 2"


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    records = load_records(tmp_path / "d.parquet")
    # Arrow unifies the message struct (missing reasoning_content -> null); nulls are dropped again.
    assert _datas(records) == ROWS
    assert records[1].where.endswith("d.parquet:row 1")


def test_hf_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert _datas(load_records(tmp_path / "ds")) == ROWS
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    records = load_records(tmp_path / "dd", split="test")
    assert _datas(records) == ROWS[2:]
    assert records[0].where == f"{tmp_path / 'dd'}[test]:row 0"
    with pytest.raises(DataError, match=r"split 'validation' not found; the dataset has \['test', 'train'\]"):
        load_records(tmp_path / "dd", split="validation")


def test_prompt_records_keep_metadata(tmp_path):
    rows = [{"prompt": "2+3?", "metadata": {"scorer": "math", "ground_truth": "5"}}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    (rec,) = load_records(tmp_path / "p.jsonl", kind="prompt")
    assert rec.data == {"prompt": [{"role": "user", "content": "2+3?"}], "metadata": rows[0]["metadata"]}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_json_line(tmp_path):
    path = _write_lines(
        tmp_path / "file.jsonl", [json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"messages": [}']
    )
    with pytest.raises(DataError, match="invalid JSON") as e:
        load_records(path)
    assert "file.jsonl:3" in str(e.value)


def test_bad_record_names_line_and_field(tmp_path):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    path = _write_lines(tmp_path / "file.jsonl", [json.dumps(ROWS[0]), json.dumps(bad)])
    with pytest.raises(DataError, match=r"file.jsonl:2: messages\[1\].content: empty assistant turn"):
        load_records(path)
    missing = _write_lines(tmp_path / "m.jsonl", [json.dumps({"prompt": "a", "completion": None})])
    with pytest.raises(DataError, match="m.jsonl:1: completion: missing required field"):
        load_records(missing)


def test_mixed_kinds_name_first_offending_line(tmp_path):
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), json.dumps({"prompt": "a", "completion": "b"})]
    path = _write_lines(tmp_path / "mix.jsonl", lines)
    with pytest.raises(DataError, match="mix.jsonl:3: record looks like kind 'prompt_completion'.*'chat'"):
        load_records(path)
    with pytest.raises(DataError, match="mix.jsonl:1: record looks like kind 'chat'"):
        load_records(path, kind="preference")


def test_missing_file_and_bad_types(tmp_path):
    with pytest.raises(DataError, match="data file not found") as e:
        load_records(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(e.value) and e.value.fix
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file type: d.csv"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_records(tmp_path / "empty_dir")
    (tmp_path / "o.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="expected a JSON list of records"):
        load_records(tmp_path / "o.json")
    _write_lines(tmp_path / "s.jsonl", ['"just a string"'])
    with pytest.raises(DataError, match="s.jsonl:1: expected a JSON object"):
        load_records(tmp_path / "s.jsonl")


def test_write_jsonl_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, ROWS)

    def exploding():
        yield ROWS[0]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl(path, exploding())
    assert _datas(load_records(path)) == ROWS  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]
