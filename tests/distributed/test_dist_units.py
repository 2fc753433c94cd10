"""Unit tests of the distributed pieces that need no process group: the per-rank shard of a
global step, the token totals it keeps, the launch checks, FSDP's shardability check."""

from __future__ import annotations

import os

import pytest
import torch

from posttrain.distributed.config import DistributedConfig
from posttrain.distributed.fsdp import check_fsdp, decoder_layers
from posttrain.distributed.launch import check_config, max_procs
from posttrain.distributed.parallel import call, local_micro, shard_micro
from posttrain.errors import ConfigError, ModelError
from posttrain.train.lm_loss import loss_targets


def _packed(rows: int, width: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.arange(rows * width).view(rows, width) % 50 + 1
    labels = ids.clone()
    labels[:, 0] = -100
    labels[:, 3] = -100  # a second sample starts at position 3 of each row
    positions = torch.tensor([0, 1, 2, 0, 1, 2]).repeat(rows, 1)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def test_shard_splits_rows_first_ranks_take_the_extra_row():
    b = _packed(5)
    r0, real0 = shard_micro(b, 0, 2)
    r1, real1 = shard_micro(b, 1, 2)
    assert real0 and real1
    assert torch.equal(r0["input_ids"], b["input_ids"][:3]) and torch.equal(
        r1["input_ids"], b["input_ids"][3:]
    )
    assert torch.equal(r1["position_ids"], b["position_ids"][3:])  # packing kept row by row


def test_empty_slice_is_one_row_with_every_label_ignored():
    b = _packed(1)
    dummy, real = shard_micro(b, 1, 2)
    assert not real
    assert dummy["input_ids"].shape == (1, 6)
    assert bool((dummy["labels"] == -100).all())
    assert bool((b["labels"] != -100).any())  # the caller's batch is untouched


@pytest.mark.parametrize("rows,world", [(5, 2), (1, 2), (7, 3), (4, 4)])
def test_rank_totals_add_up_to_the_global_totals(rows, world):
    """Tokens and packed sequences summed over the ranks' shards equal the one-process totals,
    so the all-reduced token-mean weights are the one-process weights."""

    def totals(batch):
        mask, _, seq = loss_targets(batch)
        return int(mask.sum()), int(torch.unique(seq).numel())

    b = _packed(rows)
    parts = [totals(shard_micro(b, r, world)[0]) for r in range(world)]
    assert (sum(p[0] for p in parts), sum(p[1] for p in parts)) == totals(b) == (rows * 4, rows * 2)


def test_local_micro_is_the_identity_in_one_process():
    micro = [_packed(3), _packed(2)]
    assert local_micro(micro) is micro


def test_call_runs_the_function_on_an_unwrapped_model():
    model = torch.nn.Linear(2, 2)
    assert call(model, lambda m, x: m is model and x, 7) == 7


def test_nproc_beyond_the_devices_is_refused():
    with pytest.raises(ConfigError, match="distributed.nproc <= "):
        check_config(DistributedConfig(nproc=max_procs("cpu") + 1), "cpu")
    check_config(DistributedConfig(nproc=max_procs("cpu")), "cpu")
    assert max_procs("cpu") == (os.cpu_count() or 1)


def test_several_processes_with_strategy_none_is_refused():
    with pytest.raises(ConfigError, match="strategy=none"):
        check_config(DistributedConfig(nproc=2, strategy="none"), "cpu")


def test_fsdp_refuses_a_model_without_decoder_layers(tiny_model_dir):
    with pytest.raises(ModelError, match="FSDP cannot shard Sequential"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    from posttrain.models.load import load_model

    model = load_model(str(tiny_model_dir))
    assert len(decoder_layers(model)) == 2
    with pytest.raises(ConfigError, match="peft.method=lora"):
        check_fsdp(model, DistributedConfig(strategy="fsdp"), "lora", torch.device("cpu"))
    with pytest.raises(ConfigError, match="fsdp_cpu_offload needs CUDA"):
        check_fsdp(
            model, DistributedConfig(strategy="fsdp", fsdp_cpu_offload=True), "full", torch.device("cpu")
        )


def test_group_shards_keep_whole_rankings_and_reindex_their_rows():
    from posttrain.distributed.parallel import shard_groups

    # 3 groups over 6 response rows: sizes 2, 3, 1 (padded with -1)
    index = torch.tensor([[0, 1, -1], [2, 3, 4], [5, -1, -1]])
    batch = {
        "input_ids": torch.arange(6)[:, None].repeat(1, 4),
        "attention_mask": torch.ones(6, 4, dtype=torch.long),
        "group_index": index,
        "margin": torch.tensor([0.5, 1.0, 2.0]),
    }
    a, real_a = shard_groups(batch, 0, 2)  # groups 0, 1
    b, real_b = shard_groups(batch, 1, 2)  # group 2
    assert real_a and real_b
    assert a["group_index"].tolist() == [[0, 1, -1], [2, 3, 4]] and a["input_ids"][:, 0].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert b["group_index"].tolist() == [[0, -1, -1]] and b["input_ids"][:, 0].tolist() == [5]
    assert a["margin"].tolist() == [0.5, 1.0] and b["margin"].tolist() == [2.0]
    empty, real = shard_groups({**batch, "group_index": index[:1], "margin": batch["margin"][:1]}, 1, 2)
    assert not real and empty["group_index"].tolist() == [[0, 1, -1]]


def test_a_filler_row_gives_zero_loss_and_zero_gradient_to_every_parameter(tiny_model_dir):
    """What an empty rank trains on: it must reach every parameter (DDP waits for each gradient)
    and change nothing."""
    from posttrain.models.load import load_model
    from posttrain.train.lm_loss import causal_lm_loss

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    filler, real = shard_micro(_packed(1), 1, 2)
    assert not real
    loss, m = causal_lm_loss(model, filler, "token-mean", num_tokens=10.0, num_seqs=2.0)
    loss.backward()
    assert float(loss) == 0.0 and m["tokens"] == 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_nproc_above_one_without_a_launcher_is_refused_not_ignored(tmp_path, tiny_model_dir):
    """run_sft() called directly (a pipeline stage) with distributed.nproc=2 must not train alone."""
    from posttrain.config import load_recipe
    from posttrain.train.sft import SFTRecipe, run_sft

    cfg = load_recipe(
        SFTRecipe, None, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "distributed.nproc=2"]
    )
    with pytest.raises(ConfigError, match="not started by torchrun"):
        run_sft(cfg)


def test_an_eval_recipe_under_fsdp_is_refused_naming_the_key():
    from posttrain.distributed.config import DistributedConfig
    from posttrain.distributed.launch import refuse_fsdp_eval_recipe

    with pytest.raises(ConfigError, match="eval.recipe cannot run under FSDP") as err:
        refuse_fsdp_eval_recipe(DistributedConfig(nproc=2, strategy="fsdp"), "recipes/eval_tiny.yaml")
    assert err.value.where == "eval.recipe" and "strategy=ddp" in err.value.fix
    refuse_fsdp_eval_recipe(DistributedConfig(nproc=2, strategy="ddp"), "recipes/eval_tiny.yaml")
    refuse_fsdp_eval_recipe(DistributedConfig(nproc=2, strategy="fsdp"), None)
    refuse_fsdp_eval_recipe(DistributedConfig(nproc=1, strategy="fsdp"), "recipes/eval_tiny.yaml")


def _main_first_worker(rank: int, port: int, folder: str, fail: bool) -> None:
    import time
    from pathlib import Path

    import torch.distributed as dist

    from posttrain.distributed.parallel import main_first

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cache = Path(folder) / "cache.txt"

    def work():
        if rank == 0:
            time.sleep(0.5)  # rank 1 must wait for this, not read too early
            if fail:
                raise RuntimeError("rank 0 failed")
            cache.write_text("written by rank 0")
            return "computed"
        return cache.read_text() if cache.exists() else None

    try:
        got = main_first(work)
    except RuntimeError:
        got = "raised"
    (Path(folder) / f"rank{rank}.txt").write_text(str(got))
    dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True])
def test_main_first_runs_rank_0_first_and_releases_the_others_when_it_fails(tmp_path, fail):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_main_first_worker, args=(port, str(tmp_path), fail), nprocs=2, join=True)
    got = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert got == (["raised", "None"] if fail else ["computed", "written by rank 0"])
