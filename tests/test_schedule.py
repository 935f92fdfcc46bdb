import pytest
import torch
from custom.model.schedule import WarmupPolyLR, warmup_poly_factor


def test_warmup_then_poly_values():
    lr0, n = 1e-4, 405
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
    scheduler = WarmupPolyLR(optimizer, max_epochs=n, warmup_epochs=5)
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(lr0 / 5)  # epoch 0: first warm-up step
    assert lrs[4] == pytest.approx(lr0)  # epoch 4: end of the 5 warm-up epochs
    assert lrs[5] == pytest.approx(lr0 * (1 - 5 / 405) ** 0.9)  # epoch 5: poly decay starts
    assert lrs[404] == pytest.approx(lr0 * (1 / 405) ** 0.9)  # last epoch
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))


def test_factor_never_negative():
    assert warmup_poly_factor(500, 5, 405) == 0.0
