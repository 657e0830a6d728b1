"""DP-SGD's arithmetic checked as numbers, not as "noisy differs from plain" (issue: tests that fail
on a wrong implementation). One step of the engine's DP hook on a model whose parameters start at
zero, with plain SGD at lr 1, is ``-(sum of clipped per-sample gradients + N(0, (sigma C)^2)) / B``:

* with a loss whose gradient is zero, the step is pure noise: its standard deviation is
  ``sigma * C / B`` (a missing noise, a wrong expected batch size B or a wrong clipping norm in the
  noise scale all move it);
* with sigma = 0 and huge gradients, every sample contributes exactly ``C`` of norm: the step's norm is
  at most ``b * C / B`` for a batch of b samples (a missing clip gives thousands);
* the accountant's entries are the plan's (sigma, q = batch / n, steps), and the steps the engine
  took (empty Poisson batches included) are the ones it counted (an understated rate or a dropped
  step shows here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fairforget.data.base import make_sampleset
from fairforget.privacy.accountant import ShardAccountant
from fairforget.privacy.dp_sgd import DPSGD, DPSettings
from fairforget.training import train

N, BATCH = 400, 40  # q = 0.1, 10 steps an epoch
SIGMA, CLIP = 2.0, 0.5


def _data(n: int = N, constant: bool = False):
    rng = np.random.default_rng(0)
    x = torch.ones(n, 3, 2, 2) if constant else torch.as_tensor(rng.random((n, 3, 2, 2)), dtype=torch.float32)
    return make_sampleset(x, rng.integers(0, 2, n), np.zeros(n, dtype=np.int64), np.arange(n))


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 2000, bias=False)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Scaled:
    """A loss ``scale * sum(outputs)`` (scale 0: zero gradient, the step is noise alone)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def loss(self, model, batch):
        return self.scale * model(batch.x).sum(dim=1).mean()


def _one_step(scale: float, sigma: float, seed: int = 1, constant: bool = False) -> tuple[torch.Tensor, DPSGD]:
    model = Linear()
    hook = DPSGD(sigma, CLIP, sample_seed=seed, noise_seed=seed + 1, accountant=None, poisson=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train(model, _data(BATCH, constant), seeds=[0], batch_size=BATCH, objective=Scaled(scale), optimizer=opt,
          privacy=hook)
    return model.fc.weight.detach().clone(), hook


def test_the_noise_of_one_step_has_the_planned_scale():
    step, _ = _one_step(scale=0.0, sigma=SIGMA)
    expected = SIGMA * CLIP / BATCH  # std of the noise on the averaged gradient
    assert step.std().item() == pytest.approx(expected, rel=0.03)  # 24,000 draws: 1% standard error
    assert abs(step.mean().item()) < 5 * expected / np.sqrt(step.numel())


def test_each_sample_is_clipped_to_the_norm():
    step, _ = _one_step(scale=1e4, sigma=0.0, constant=True)
    # every per-sample gradient is the same, of norm 1e4 * sqrt(12 * 2000) >> CLIP before clipping:
    # clipped, their mean has norm exactly CLIP (without the clip: about 1.5e6)
    assert step.norm().item() == pytest.approx(CLIP, rel=1e-4)


def test_the_accountant_gets_the_plan_and_every_step_taken():
    data = _data()
    acc = ShardAccountant(0, "rdp", 1e-5)
    dp = DPSettings(SIGMA, CLIP, 1e-5, "rdp", 1e9)
    hook = dp.hook(11, 12, acc)
    model = Linear()
    train(model, data, seeds=[0, 1, 2], batch_size=BATCH, objective=Scaled(1.0),
          optimizer=torch.optim.SGD(model.parameters(), lr=0.1), privacy=hook)
    planned = dp.planned(N, BATCH, 3)
    assert planned == [(SIGMA, BATCH / N, 30)]
    assert acc.history == planned  # sigma, q = batch / n exactly, steps = epochs * n / batch
    assert hook.spent()["steps"] == 30.0 and hook.spent()["sample_rate"] == BATCH / N
