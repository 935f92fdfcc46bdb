"""Eq. 2 of Jiang et al. against a hand computation, and the sum over heads."""

import torch
from custom.model.losses import CascadeDiceLoss


def test_loss_equals_eq2_by_hand():
    logits = torch.tensor([[[[[2.0, -1.0]]], [[[0.5, 0.0]]], [[[-3.0, 1.0]]]]])  # (1, 3, 1, 1, 2)
    target = torch.tensor([[[[[1.0, 0.0]]], [[[1.0, 1.0]]], [[[0.0, 0.0]]]]])
    p = torch.sigmoid(logits)
    expected = 0.0
    for c in range(3):  # 1 - 2 sum(p g) / (sum p^2 + sum g^2), summed over the regions
        pc, gc = p[0, c].flatten(), target[0, c].flatten()
        expected += 1 - (2 * (pc * gc).sum() + 1e-5) / ((pc**2).sum() + (gc**2).sum() + 1e-5)
    loss = CascadeDiceLoss()(logits, target)
    assert torch.allclose(loss, expected, atol=1e-6)
    # explicit numbers for the first region: p = (0.8808, 0.2689), g = (1, 0)
    p0 = torch.sigmoid(torch.tensor([2.0, -1.0]))
    assert abs(float(1 - 2 * p0[0] / (p0.square().sum() + 1)) - 0.046825) < 1e-5


def test_loss_sums_heads_with_weights():
    torch.manual_seed(0)
    heads = [torch.randn(1, 3, 4, 4, 4) for _ in range(3)]
    target = (torch.rand(1, 3, 4, 4, 4) > 0.5).float()
    single = [CascadeDiceLoss()(h, target) for h in heads]
    assert torch.allclose(CascadeDiceLoss()(heads, target), sum(single))
    weighted = CascadeDiceLoss(head_weights=(0.5, 1.0, 2.0))(heads, target)
    assert torch.allclose(weighted, 0.5 * single[0] + single[1] + 2.0 * single[2])


def test_empty_region_predicted_empty_costs_nothing():
    logits = torch.full((1, 3, 4, 4, 4), -30.0)
    target = torch.zeros(1, 3, 4, 4, 4)
    assert float(CascadeDiceLoss()(logits, target)) < 1e-3
