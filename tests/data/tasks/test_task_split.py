from __future__ import annotations

from collections import Counter

import pytest

from posttrain.data.tasks import TASKS, get_task, make_split
from posttrain.errors import ConfigError


def test_unknown_task_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_task("arithm")
    text = str(err.value)
    assert "did you mean 'arith'" in text
    for name in TASKS:
        assert name in text


@pytest.mark.parametrize("name", ["arith", "countdown", "sort"])
def test_split_deterministic_disjoint_and_sized(name):
    test = make_split(name, "test", 40, seed=0)
    train = make_split(name, "train", 300, seed=0)
    assert make_split(name, "test", 40, seed=0) == test
    assert Counter(p.level for p in test) == {lv: 40 for lv in TASKS[name].levels}
    assert Counter(p.level for p in train) == {lv: 300 for lv in TASKS[name].levels}
    assert len({p.question for p in test}) == len(test)  # test questions are distinct
    assert not {p.question for p in test} & {p.question for p in train}
    assert [p.level for p in test] == sorted(p.level for p in test)


def test_test_split_independent_of_size_seed_changes_it():
    small = make_split("arith", "test", 10, levels=[2, 3])
    large = make_split("arith", "test", 30, levels=[3, 2])
    assert [p for p in large if p.level == 2][:10] == [p for p in small if p.level == 2]
    assert make_split("arith", "test", 10, seed=1, levels=[2]) != make_split("arith", "test", 10, levels=[2])


def test_unique_train_and_impossible_sizes():
    train = make_split("countdown", "train", 50, levels=[1], unique=True)
    assert len({p.question for p in train}) == 50
    with pytest.raises(ConfigError, match="too few distinct test questions"):
        make_split("countdown", "test", 200, levels=[1])  # level 1 has ~125 distinct questions in all


def test_bad_arguments():
    with pytest.raises(ConfigError, match="no level 7"):
        make_split("arith", "test", 5, levels=[7])
    with pytest.raises(ConfigError, match="split"):
        make_split("arith", "valid", 5)
    with pytest.raises(ConfigError, match="n_per_level"):
        make_split("arith", "train", -1)


def test_task_problems_keeps_each_tasks_own_levels_and_rejects_unknown_ones():
    from posttrain.data.tasks import task_problems

    got = task_problems(["arith", "countdown"], "test", 2, levels=[3, 4])
    assert Counter((p.task, p.level) for p in got) == {("arith", 3): 2, ("arith", 4): 2, ("countdown", 3): 2}
    with pytest.raises(ConfigError, match=r"level\(s\) \[9\]") as err:
        task_problems(["arith", "sort"], "test", 2, levels=[1, 9])
    assert err.value.where == "levels" and "1, 2, 3, 4" in err.value.fix
