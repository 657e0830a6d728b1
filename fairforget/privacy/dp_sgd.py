"""DP-SGD (Abadi et al. 2016) with Opacus, as the training engine's privacy hook.

:class:`DPSGD` wraps what :func:`fairforget.training.train` hands it: the model gets Opacus'
per-sample gradient hooks (``GradSampleModule``), the optimizer becomes a ``DPOptimizer`` (clip each
sample's gradient to ``max_grad_norm``, add ``N(0, (noise_multiplier * max_grad_norm)^2)``), and the
loader draws Poisson batches (``UniformWithReplacementSampler``: every sample independently with
probability ``q = batch_size / n``, ``int(1 / q)`` batches an epoch). What it spent goes into the
shard's :class:`fairforget.privacy.accountant.ShardAccountant`.

Secret, recorded randomness: the Poisson masks and the noise come from two generators seeded with two
separate seeds (``sample_seed``, ``noise_seed``). A SISA shard draws them fresh for every training
from the operating system's secure randomness at its site (:func:`fairforget.site_secret.secure_seed`)
and records them, mode 0600, in its state folder (:mod:`fairforget.sisa`, ``STATE/dp-seeds.json``):
nobody without that file (the server, the other sites) can regenerate the noise, and the site itself
can replay its training bit for bit (``fairforget verify --state-dir``). ``dp-secure-mode`` (Opacus'
torchcsprng generator) is refused by the config's validation where torchcsprng is not installed
(it does not install with torch 2.14); where it is, the noise comes from it and cannot be replayed.

Every Poisson batch is a DP-SGD step, an empty one too (the accountant counts it): the engine runs
it through the model and Opacus' optimizer, which clips nothing and adds the noise
(:attr:`DPSGD.steps_on_empty`).

BatchNorm mixes samples of a batch and has no per-sample gradient: under DP the shard models are
built with GroupNorm (``SimpleConvNet(norm="group")``, what ``ModuleValidator.fix`` would do; the
feature models of :mod:`fairforget.models` use GroupNorm always, and their scattering front end has no
parameters, so Opacus hooks and clips the head only).

Under a plan (``dp-plan``, :mod:`fairforget.privacy.planner`) a SISA stage is one "epoch" of exactly
the planned number of Poisson steps (``UniformWithReplacementSampler(steps=...)``) at the planned
expected batch, learning rate and clipping norm.
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

from fairforget.privacy.accountant import ShardAccountant
from fairforget.privacy.gdp import Entry, dp_sgd_entry
from fairforget.privacy.planner import Plan, StagePlan, entry, parse_plan


@dataclass(frozen=True)
class DPSettings:
    """The run-config ``dp-*`` keys a training needs."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    max_epsilon: float
    secure_mode: bool = False
    plan_json: str = ""  # dp-plan: the planner's per-stage schedule (fairforget/privacy/planner.py); "": none

    @classmethod
    def from_config(cls, cfg: Any) -> DPSettings | None:
        """``None`` when ``dp`` is off."""
        if not cfg.dp:
            return None  # dp-secure-mode without torchcsprng is refused by RunConfig.validate
        settings = cls(cfg.dp_noise_multiplier, cfg.dp_max_grad_norm, cfg.dp_delta, cfg.dp_accountant,
                       cfg.dp_max_epsilon, cfg.dp_secure_mode, getattr(cfg, "dp_plan", ""))
        parse_plan(settings.plan_json, cfg.slices)  # a plan for another number of stages: one line, now
        return settings

    @property
    def plan(self) -> Plan | None:
        return Plan.from_json(self.plan_json) if self.plan_json.strip() else None

    def stage_plan(self, stage: int | None) -> StagePlan | None:
        """The planner's schedule of SISA stage ``stage`` (None: not planned, or not a SISA stage)."""
        plan = self.plan
        return plan.stages[stage - 1] if plan is not None and stage is not None else None

    def hook(self, sample_seed: int, noise_seed: int, accountant: ShardAccountant | None = None,
             poisson: bool = True, stage: StagePlan | None = None) -> DPSGD:
        """One training's DP-SGD hook, its Poisson masks drawn from ``sample_seed`` and its noise from
        ``noise_seed`` (a shard's are secret: :meth:`fairforget.sisa.SisaShard.dp_hook`); a planned
        ``stage`` sets the clipping norm and the number of Poisson steps."""
        return DPSGD(self.noise_multiplier, stage.max_grad_norm if stage else self.max_grad_norm, sample_seed,
                     noise_seed, accountant, self.secure_mode, poisson, steps=stage.steps if stage else None)

    def fixed(self, batch_size: int) -> dict[str, Any]:
        """The settings a site fixes in its state at its first DP training (``STATE/dp-settings.json``):
        a later run that differs would change the guarantee its models were trained under."""
        return {"dp": True, "dp-noise-multiplier": self.noise_multiplier, "dp-max-grad-norm": self.max_grad_norm,
                "dp-delta": self.delta, "dp-accountant": self.accountant, "dp-max-epsilon": self.max_epsilon,
                "dp-secure-mode": self.secure_mode, "batch-size": int(batch_size),
                **({"dp-plan": self.plan_json} if self.plan_json else {})}

    def planned(self, n: int, batch_size: int, epochs: int, stage: int | None = None) -> list[Entry]:
        """What ``epochs`` epochs on ``n`` samples will add to the accountant (SISA stage ``stage`` under
        a plan: its planned steps at rate ``planned batch / n``)."""
        planned = self.stage_plan(stage)
        if planned is not None:
            return [entry(self.noise_multiplier, n, planned)] if n > 0 else []
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
    """The engine's privacy hook for DP-SGD (one training; the accountant is the shard's). The
    Poisson masks come from a CPU generator seeded ``sample_seed``, the noise from one seeded
    ``noise_seed`` (on the model's device), or from torchcsprng in secure mode."""

    name = "dp-sgd"
    steps_on_empty = True  # an empty Poisson batch is a step (noise only), as the accountant counts it

    def __init__(self, noise_multiplier: float, max_grad_norm: float, sample_seed: int, noise_seed: int,
                 accountant: ShardAccountant | None = None, secure_mode: bool = False, poisson: bool = True,
                 steps: int | None = None) -> None:
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise ValueError(f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, "
                             f"{max_grad_norm}")
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.accountant = accountant
        self.secure_mode, self.poisson = secure_mode, poisson
        self.steps = steps  # Poisson steps of the whole training (a planned stage: one epoch); None: 1/q an epoch
        self.sample_gen = torch.Generator().manual_seed(int(sample_seed) % (1 << 63))
        self.noise_gen = None if secure_mode else torch.Generator().manual_seed(int(noise_seed) % (1 << 63))
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
            sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=self._rate, generator=self.sample_gen,
                                                    steps=self.steps)
            loader = DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn)
            expected = max(1, int(n * self._rate))
        else:  # the engine's own shuffled batches (tests: DP with no noise equals plain training)
            expected = batch_size
        self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        device = next(model.parameters()).device
        if self.noise_gen is not None and device.type != "cpu":
            self.noise_gen = torch.Generator(device=device).manual_seed(int(self.noise_gen.initial_seed()))
        if self.secure_mode:  # only where torchcsprng is installed (RunConfig.validate refuses it otherwise)
            import torchcsprng

            self.noise_gen = torchcsprng.create_random_device_generator("/dev/urandom")
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
