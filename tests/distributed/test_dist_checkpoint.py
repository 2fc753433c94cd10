"""Checkpoint layouts of distributed runs, in one process: a DCP (sharded-layout) checkpoint
round-trips into a plain model, and a checkpoint of another model is refused by name."""

from __future__ import annotations

import pytest
import torch

from posttrain.distributed import checkpoint as dist_ckpt
from posttrain.errors import PosttrainError
from posttrain.train.checkpoint import save_checkpoint
from posttrain.train.optim import OptimConfig, build_optimizer, build_scheduler


def _model(hidden: int = 8, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))


def _trained(model: torch.nn.Module):
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    sched = build_scheduler(opt, OptimConfig(lr=1e-2), 10)
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return opt, sched


def test_sharded_layout_round_trips_weights_optimizer_and_scheduler(tmp_path):
    model = _model()
    opt, sched = _trained(model)
    path = dist_ckpt._save_sharded(tmp_path, 1, model, opt, sched, {"epoch": 0, "index": 3}, keep_last=2)
    assert (path / dist_ckpt.DCP_METADATA).is_file() and (path / "COMPLETE").is_file()
    fresh = _model(seed=1)
    fresh_opt, fresh_sched = build_optimizer(fresh, OptimConfig(lr=1e-2)), None
    fresh_sched = build_scheduler(fresh_opt, OptimConfig(lr=1e-2), 10)
    state = dist_ckpt.load(path, fresh, fresh_opt, fresh_sched)
    assert state == {"step": 1, "epoch": 0, "index": 3}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved, loaded = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)
    assert fresh_sched.last_epoch == sched.last_epoch == 1


@pytest.mark.parametrize("layout", ["sharded", "plain"])
def test_a_checkpoint_of_another_model_is_refused(tmp_path, layout):
    model = _model(hidden=8)
    opt, sched = _trained(model)
    if layout == "sharded":
        path = dist_ckpt._save_sharded(tmp_path, 1, model, opt, sched, {}, keep_last=2)
    else:
        path = save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=2)
    other = _model(hidden=16)
    other_opt = build_optimizer(other, OptimConfig())
    with pytest.raises(PosttrainError, match="from a different model") as err:
        dist_ckpt.load(path, other, other_opt, build_scheduler(other_opt, OptimConfig(), 10))
    assert "there, [16" in str(err.value)  # names the parameter and both shapes
