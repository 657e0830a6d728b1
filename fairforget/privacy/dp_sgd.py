"""DP-SGD (Abadi et al. 2016) with Opacus, as the training engine's privacy hook.

:class:`DPSGD` wraps what :func:`fairforget.training.train` hands it: the model gets Opacus'
per-sample gradient hooks (``GradSampleModule``), the optimizer becomes a ``DPOptimizer`` (clip each
sample's gradient to ``max_grad_norm``, add ``N(0, (noise_multiplier * max_grad_norm)^2)``), and the
loader draws Poisson batches (``UniformWithReplacementSampler``: every sample independently with
probability ``q = batch_size / n``, ``int(1 / q)`` batches an epoch). What it spent goes into the
shard's :class:`fairforget.privacy.accountant.ShardAccountant`.

Replayable: with ``secure_mode`` off, the Poisson masks and the noise come from two CPU generators
seeded by the hook's seed, so a shard retrained after a deletion equals the shard trained from
scratch without the deleted samples (SISA's exactness, kept under DP). Opacus' ``secure_mode``
draws cryptographically secure noise (``torchcsprng``), which production deployments should use and
which, by design, cannot be replayed: exact unlearning is then exact in distribution only.

BatchNorm mixes samples of a batch and has no per-sample gradient: under DP the shard models are
built with GroupNorm (``SimpleConvNet(norm="group")``, what ``ModuleValidator.fix`` would do).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from fairforget.config import ConfigError
from fairforget.privacy.accountant import ShardAccountant
from fairforget.privacy.gdp import Entry, dp_sgd_entry


@dataclass(frozen=True)
class DPSettings:
    """The run-config ``dp-*`` keys a training needs."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    max_epsilon: float
    secure_mode: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> DPSettings | None:
        """``None`` when ``dp`` is off."""
        if not cfg.dp:
            return None
        if cfg.dp_secure_mode:
            try:
                import torchcsprng  # noqa: F401
            except ImportError:
                raise ConfigError("config key 'dp-secure-mode' = true needs the torchcsprng package "
                                  "(cryptographic noise); install it or turn secure mode off") from None
        return cls(cfg.dp_noise_multiplier, cfg.dp_max_grad_norm, cfg.dp_delta, cfg.dp_accountant,
                   cfg.dp_max_epsilon, cfg.dp_secure_mode)

    def hook(self, seed: int, accountant: ShardAccountant | None = None, poisson: bool = True) -> DPSGD:
        return DPSGD(self.noise_multiplier, self.max_grad_norm, seed, accountant, self.secure_mode, poisson)

    def planned(self, n: int, batch_size: int, epochs: int) -> list[Entry]:
        """What ``epochs`` epochs on ``n`` samples will add to the accountant."""
        return dp_sgd_entry(n, batch_size, epochs, self.noise_multiplier)


class _Counted:
    """The Poisson loader, counting the batches it draws (empty ones too: each is a DP-SGD step)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.batches = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.batches += 1
            yield batch


class DPSGD:
    """The engine's privacy hook for DP-SGD (one training; the accountant is the shard's)."""

    name = "dp-sgd"

    def __init__(self, noise_multiplier: float, max_grad_norm: float, seed: int,
                 accountant: ShardAccountant | None = None, secure_mode: bool = False, poisson: bool = True) -> None:
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise ValueError(f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, "
                             f"{max_grad_norm}")
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.accountant = accountant
        self.secure_mode, self.poisson = secure_mode, poisson
        self.sample_gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
        self.noise_gen = None if secure_mode else torch.Generator().manual_seed((int(seed) + 1) % (1 << 63))
        self._gsm: GradSampleModule | None = None
        self._loader: _Counted | None = None
        self._rate = 0.0
        self._spent: list[Entry] = []

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               loader: Any) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"the model cannot be trained with DP-SGD: {errors[0]}")
        n = len(loader.dataset)
        batch_size = getattr(loader.batch_sampler, "batch_size", None) or loader.batch_size or n
        self._rate = min(1.0, batch_size / n)
        if self.poisson:
            sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=self._rate, generator=self.sample_gen)
            loader = DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn)
            expected = max(1, int(n * self._rate))
        else:  # the engine's own shuffled batches (tests: DP with no noise equals plain training)
            expected = batch_size
        self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        device = next(model.parameters()).device
        if self.noise_gen is not None and device.type != "cpu":
            self.noise_gen = torch.Generator(device=device).manual_seed(int(self.noise_gen.initial_seed()))
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                   max_grad_norm=self.max_grad_norm, expected_batch_size=expected,
                                   loss_reduction="mean", generator=self.noise_gen, secure_mode=self.secure_mode)
        self._loader = _Counted(loader)
        return model, dp_optimizer, self._loader

    def spent(self) -> dict[str, float]:
        """Record the steps taken into the shard's accountant (once) and report the spend."""
        if self._loader is not None and self._loader.batches:
            entry = (self.noise_multiplier, self._rate, self._loader.batches)
            self._spent.append(entry)
            if self.accountant is not None:
                self.accountant.record([entry])
            self._loader.batches = 0
        steps = sum(t for _, _, t in self._spent)
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self._rate, "steps": float(steps)}

    def close(self) -> None:
        """Take Opacus' hooks off the model again."""
        if self._gsm is not None:
            self._gsm._close()
            self._gsm = None
