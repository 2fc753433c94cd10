import torch

from posttrain.algos.cross_entropy import fused_linear_cross_entropy, reference_linear_cross_entropy


def _grads(fn, h, w, y, wt, **kw):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss, nll = fn(h, w, y, wt, **kw)
    loss.backward()
    return loss.detach(), nll, h.grad, w.grad


def test_fused_equals_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 16, generator=g), torch.randn(53, 16, generator=g)
    y = torch.randint(0, 53, (37,), generator=g)
    wt = torch.rand(37, generator=g)
    ref = _grads(reference_linear_cross_entropy, h, w, y, wt)
    for chunk in (1, 8, 1000):
        fused = _grads(fused_linear_cross_entropy, h, w, y, wt, chunk_size=chunk)
        for a, b in zip(fused, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_uniform_logits_give_log_vocab():
    h = torch.zeros(4, 8)
    w = torch.randn(10, 8)
    loss, nll = fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), torch.full((4,), 0.25))
    torch.testing.assert_close(nll, torch.full((4,), torch.log(torch.tensor(10.0)).item()))
    torch.testing.assert_close(loss, torch.log(torch.tensor(10.0)))


def test_frozen_head_gets_no_gradient_but_hidden_does():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(7, 4)  # frozen, as with LoRA
    loss, _ = fused_linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4, 5]), torch.ones(5))
    loss.backward()
    assert h.grad is not None and w.grad is None
    assert h.grad.abs().sum() > 0
