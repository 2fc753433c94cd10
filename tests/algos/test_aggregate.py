import pytest
import torch

from posttrain.algos.aggregate import aggregate_loss, token_weights


def test_token_weights_match_aggregate_loss_on_hand_values():
    # two sequences: [1, 2, 3] and [10]
    loss = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    seq = torch.tensor([0, 0, 0, 1])
    flat = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(16 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 10) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum", norm=4).item() == pytest.approx(
        (6 / 4 + 10 / 4) / 2
    )
    for mode, norm in (("token-mean", 1.0), ("seq-mean-token-mean", 1.0), ("seq-mean-token-sum", 4.0)):
        w = token_weights(seq, mode, norm=norm)
        assert (w * flat).sum().item() == pytest.approx(aggregate_loss(loss, mask, mode, norm=norm).item())


def test_global_counts_make_accumulation_equal_full_batch():
    flat = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0])
    seq = torch.tensor([0, 0, 1, 2, 2])
    full = (token_weights(seq, "seq-mean-token-mean") * flat).sum()
    # split into two micro-batches along sequence boundaries, pass global counts
    a = (token_weights(seq[:3], "seq-mean-token-mean", num_seqs=3) * flat[:3]).sum()
    b = (token_weights(seq[3:], "seq-mean-token-mean", num_seqs=3) * flat[3:]).sum()
    assert (a + b).item() == pytest.approx(full.item())
    full_t = (token_weights(seq, "token-mean") * flat).sum()
    a = (token_weights(seq[:3], "token-mean", num_tokens=5) * flat[:3]).sum()
    b = (token_weights(seq[3:], "token-mean", num_tokens=5) * flat[3:]).sum()
    assert (a + b).item() == pytest.approx(full_t.item())


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="token-mean"):
        token_weights(torch.tensor([0]), "mean")
