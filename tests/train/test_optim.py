import math

import pytest
import torch

from posttrain.train.optim import OptimConfig, build_optimizer, lr_lambda


def test_warmup_then_cosine_hand_values():
    assert lr_lambda(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_lambda(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    mid = 10 + 45
    assert lr_lambda(mid, 100, 10, "cosine", 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert lr_lambda(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model[0].weight)] == 0.1
    assert decays[id(model[0].bias)] == 0.0 and decays[id(model[1].weight)] == 0.0
