"""Offline PRM / RM data from the task suite: labels, pairs, rankings, files."""

from __future__ import annotations

from posttrain.data.loaders import load_records
from posttrain.data.tasks import get_task
from posttrain.data.tasks.prm_data import (
    preference_records,
    prm_records,
    ranking_records,
    task_problems,
    write_reward_data,
)


def _problems():
    return task_problems(["arith", "countdown", "sort"], "train", 6, seed=1)


def test_prm_records_label_correct_chains_one_and_corrupted_until_first_error():
    problems = _problems()
    rows = prm_records(problems, n_corrupt=2, seed=0)
    assert len(rows) == 3 * len(problems)
    for i, p in enumerate(problems):
        correct, *corrupted = rows[3 * i : 3 * i + 3]
        assert correct["completions"] == list(p.steps) and correct["labels"] == [1] * len(p.steps)
        assert correct["final"] == f"Answer: {p.answer}"
        for row in corrupted:
            labels = row["labels"]
            assert 0 in labels and labels == sorted(labels, reverse=True)  # 1 ... 1 0 ... 0
            assert labels == [int(x) for x in get_task(p.task).check_steps(p, row["completions"])]
            assert row["metadata"]["chain"] == "corrupted"


def test_prm_records_are_reproducible():
    assert prm_records(_problems(), seed=3) == prm_records(_problems(), seed=3)
    assert prm_records(_problems(), seed=3) != prm_records(_problems(), seed=4)


def test_preference_records_prefer_the_correct_response():
    problems = _problems()
    for p, row in zip(problems, preference_records(problems, "<step>", seed=0), strict=True):
        assert row["chosen"] == p.response("<step>") and row["rejected"] != row["chosen"]
        wrong_steps = row["rejected"].split("<think>")[1].split("</think>")[0].split("<step>")
        first = row["metadata"]["first_wrong_step"]
        assert get_task(p.task).check_steps(p, wrong_steps)[first] is False


def test_ranking_records_order_by_later_first_error():
    problems = _problems()
    for p, row in zip(problems, ranking_records(problems, "<step>", max_responses=4, seed=0), strict=True):
        ranking, responses = row["ranking"], row["responses"]
        assert sorted(ranking) == list(range(len(responses))) and 2 <= len(responses) <= 4
        assert responses[ranking[0]] == p.response("<step>")
        firsts = row["metadata"]["first_wrong_steps"]
        assert firsts == sorted(firsts, reverse=True) and len(set(firsts)) == len(firsts)
        task = get_task(p.task)
        for k, idx in enumerate(ranking[1:]):
            steps = responses[idx].split("<think>")[1].split("</think>")[0].split("<step>")
            assert task.check_steps(p, steps).index(False) == firsts[k]


def test_write_reward_data_files_load_as_their_kinds(tmp_path):
    files = write_reward_data(tmp_path, tasks=["sort"], n_per_level=2, seed=0)
    assert load_records(files["pairs"])[0].kind == "preference"
    assert load_records(files["rankings"])[0].kind == "ranking"
    prm = load_records(files["prm"], kind="prompt")
    assert len(prm) == 2 * 2 * len(get_task("sort").levels) and "labels" in prm[0].data
