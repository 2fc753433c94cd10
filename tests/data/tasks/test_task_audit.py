"""Decontaminated pretraining corpus: no test question of any task and level, a manifest that matches."""

from __future__ import annotations

import gzip

import pytest

from posttrain.data.tasks import (
    TASKS,
    find_test_question,
    get_task,
    held_out_fraction,
    in_any_test,
    make_split,
)
from posttrain.data.tasks.audit import CORPUS_FILE, MANIFEST_FILE, audit_corpus, read_corpus, write_corpus
from posttrain.errors import DataError
from posttrain.train.pretrain import CorpusConfig, corpus_records


def _test_questions(task: str, level: int) -> list[str]:
    """Up to 100 test questions of one level (the smallest levels have fewer distinct ones)."""
    for n in (100, 50):
        try:
            return [p.question for p in make_split(task, "test", n, levels=[level])]
        except Exception:
            continue
    raise AssertionError(f"{task} L{level} has under 50 test questions")


def test_question_levels_cover_every_generated_level():
    # A missing level would let that level's test questions leak into the corpus.
    for task in TASKS.values():
        for level in task.levels:
            for q in _test_questions(task.name, level)[:30]:
                assert level in task.question_levels(q), (task.name, level, q)


def test_question_levels_across_tasks():
    assert get_task("arith").question_levels("Compute 3 + 17 + 6") == (2,)
    assert get_task("arith_mag").question_levels("Compute 3 + 17 + 6") == (3,)
    assert get_task("arith_mag").question_levels("Compute 3 + 7 + 6") == (1,)
    assert get_task("arith_mag").question_levels("Compute 3 + 7") == ()
    assert get_task("sort").question_levels("Compute 3 + 7") == ()
    assert get_task("countdown").question_levels("Use 2 3 7 to make 23") == (2,)
    assert get_task("sort").question_levels("Sort 7 2 9 2") == (2,)
    # arith_mag's easiest level holds out half; arith's level 2 a fifth: the larger share wins.
    assert held_out_fraction("Compute 3 + 7 + 6") == 0.5
    assert held_out_fraction("Compute 13 + 7 + 6") == 0.2
    assert held_out_fraction("Hello") == 0.0 and not in_any_test("Hello")


def test_find_test_question_finds_a_test_question_beginning_a_line():
    q = make_split("arith_mag", "test", 1, levels=[1])[0].question  # "Compute a + b + c"
    assert find_test_question(q) == (q, "arith_mag", 1)
    assert find_test_question(f"intro\n  {q} + 7\n") == (q, "arith_mag", 1)  # a longer question's prefix
    assert find_test_question(f"Then {q}") is None  # not at a line start
    train = make_split("sort", "train", 1, levels=[1])[0].question
    assert find_test_question(train, [get_task("sort")]) is None
    # A prefix that ends on an operator is no question of any task (expr.well_formed).
    assert held_out_fraction("Compute 17 - 2 +") == 0.0 and held_out_fraction("Compute (3 + 4") == 0.0
    assert held_out_fraction("Compute 17 - 2") > 0


def test_default_corpus_has_no_test_question_of_any_task_and_level():
    records, removed = corpus_records(CorpusConfig(), seed=0)  # the default's full size
    assert len(records) == CorpusConfig().n_docs
    assert removed["test split"] > 1000 and set(removed) <= {"test split", "exact question"} | {
        f"{n}-gram" for n in range(5, 14)
    }
    questions = {r["question"] for r in records}
    leaks = {
        f"{t.name}/L{lv}": sum(q in questions for q in _test_questions(t.name, lv))
        for t in TASKS.values()
        for lv in t.levels
    }
    assert sum(leaks.values()) == 0, leaks
    assert not [r["text"] for r in records if find_test_question(r["text"]) is not None]
    # The old rule leaks (the issue measured 468 of 1,800): the checks above can fail.
    old, _ = corpus_records(CorpusConfig(exclude_test=False), seed=0)
    old_q = {r["question"] for r in old}
    assert sum(q in old_q for q in _test_questions("arith_mag", 2)) > 5
    # The v2 rule (exact test questions only) left documents that begin with a whole test question.
    v2 = [r for r in old if not in_any_test(r["question"])]
    assert sum(find_test_question(r["text"]) is not None for r in v2) > 1000


def test_manifest_matches_corpus_and_detects_tampering(tmp_path):
    cfg = CorpusConfig(tasks=["arith", "sort"], n_docs=300)
    records, removed = corpus_records(cfg, seed=3)
    write_corpus(tmp_path, records, cfg, 3, removed)
    back, manifest = read_corpus(tmp_path)
    assert back == records and manifest["seed"] == 3 and manifest["config"]["n_docs"] == 300
    assert manifest["removed"] == {"contaminated": sum(removed.values()), "by_match": removed}
    # The manifest's config and seed regenerate the same corpus.
    again, _ = corpus_records(CorpusConfig(**manifest["config"]), manifest["seed"])
    assert again == back
    assert audit_corpus(tmp_path) == {
        "docs": 300,
        "questions": len({r["question"] for r in records}),
        "test_questions": 0,
        "docs_with_test_question": 0,
    }
    body = gzip.decompress((tmp_path / CORPUS_FILE).read_bytes()).replace(b"Sort", b"Sorted", 1)
    (tmp_path / CORPUS_FILE).write_bytes(gzip.compress(body))
    with pytest.raises(DataError, match="sha256"):
        read_corpus(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(DataError, match="no corpus_manifest.json"):
        read_corpus(tmp_path)


def test_contaminated_corpus_is_counted_by_the_audit(tmp_path):
    cfg = CorpusConfig(tasks=["arith"], n_docs=300, levels=[1], exclude_test=False)
    records, _ = corpus_records(cfg, seed=0)
    write_corpus(tmp_path, records, cfg, 0, {})
    counts = audit_corpus(tmp_path)
    # Level 1 has ~600 distinct questions, half of them held out.
    assert 0.3 < counts["test_questions"] / counts["questions"] < 0.7
