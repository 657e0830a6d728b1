"""A conditional DDPM for one shard: diffusers' ``UNet2DModel`` and schedulers, classifier-free and
classifier guidance.

Conditioning is factorised: the label embedding is ``E_class[y] + E_private[a]`` (each table with an
extra *null* row), added to the UNet's time embedding through ``class_embed_type="identity"``. So the
generator can compose a (class, private attribute) pair it has rarely or never seen together, as long
as it has seen the class and the attribute; a Biased-MNIST shard at rho = 0.99 has almost no
off-colour digits, and those are exactly the groups augmentation must fill. In ``class`` mode the
private embedding is always null.

Training (Ho et al. 2020): ``DDPMScheduler.add_noise`` at a uniform timestep, MSE on the noise; each
label factor is dropped to its null row with probability ``label_dropout`` (Ho & Salimans 2022), so
the same network is also the class-only, attribute-only and unconditional model. Sampling:
``DDIMScheduler`` (Song et al. 2021; ``eta`` = 1 by default: with a small model the deterministic
eta = 0 path collapses to the mean background colour, the stochastic one does not) with ``eps =
eps_null + w (eps_cond - eps_null)``, composed over the two factors (Liu et al. 2022) so that rare
pairs come from two well-trained conditionals; optionally classifier guidance ``eps_hat = eps - s
sqrt(1 - abar_t) grad_x log p(y | x0_hat(x_t))`` with a classifier on clean images applied to the
predicted clean image (the noise-free variant of Dhariwal & Nichol 2021).

Images are (N, 3, H, W) in [0, 1]; the model works in [-1, 1]. Everything is seeded: the same
generator, labels and seed give the same samples.

With ``dp`` the generator is trained with DP-SGD (:func:`_train_dp`: Poisson batches, Opacus
per-sample gradients in hooks mode, per-sample clipping and Gaussian noise, the shard's accountant
and its hard stop), and nothing in it is left out of the guarantee: every trainable layer (convs,
linears, GroupNorm, the label embeddings, the mid-block self-attention's projections) gets exact
per-sample gradients. One Opacus pitfall is worked around, not refused: its conv grad sampler
assumes NCHW-contiguous inputs, and the attention block hands the next ResNet a channels-last view
(:func:`_contiguous_conv_inputs`); a self-check on the first step refuses training if any layer's
per-sample gradients do not add up to the batch gradient.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fairforget.privacy.accountant import ShardAccountant, epsilon_of
from fairforget.privacy.dp_sgd import DPSettings
from fairforget.privacy.gdp import Entry
from fairforget.site_secret import secure_seed
from fairforget.storage import finite, replace_dir, torch_load


class GeneratorError(ValueError):
    """A generator that cannot be trained or loaded; the message is one line for the user."""


@dataclass(frozen=True)
class GeneratorSettings:
    image_size: int
    num_classes: int
    num_private: int
    groups: str = "class-private"  # class-private | class
    width: int = 32  # UNet block_out_channels = (width, 2 width)
    train_steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    timesteps: int = 1000
    label_dropout: float = 0.2
    ddim_steps: int = 25
    ddim_eta: float = 1.0
    guidance_scale: float = 1.5
    classifier_scale: float = 0.0
    group_reweight: float = 0.0  # batch sampling weight n_group^-power (0 = uniform; 1 = every group equal)
    device: str = "cpu"

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, num_private: int) -> GeneratorSettings:
        return cls(
            image_size=cfg.image_size, num_classes=num_classes, num_private=num_private,
            groups=cfg.augment_groups, width=cfg.diffusion_width, train_steps=cfg.diffusion_train_steps,
            batch_size=cfg.diffusion_batch_size, lr=cfg.diffusion_lr, timesteps=cfg.diffusion_timesteps,
            label_dropout=cfg.label_dropout, ddim_steps=cfg.ddim_steps, ddim_eta=cfg.ddim_eta,
            guidance_scale=cfg.guidance_scale,
            classifier_scale=cfg.classifier_guidance, group_reweight=cfg.diffusion_group_reweight,
            device=cfg.torch_device(),
        )

    @property
    def uses_private(self) -> bool:
        return self.groups == "class-private"


class LabelEmbedding(nn.Module):
    """``E_class[y] + E_private[a]``; index ``num_classes`` / ``num_private`` is the null label."""

    def __init__(self, num_classes: int, num_private: int, dim: int) -> None:
        super().__init__()
        self.null_class, self.null_private = num_classes, num_private
        self.cls = nn.Embedding(num_classes + 1, dim)
        self.priv = nn.Embedding(num_private + 1, dim)

    def forward(self, y: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
        return self.cls(y) + self.priv(private)


class ConditionalGenerator(nn.Module):
    """The denoiser: a diffusers ``UNet2DModel`` plus the factorised label embedding."""

    def __init__(self, settings: GeneratorSettings) -> None:
        super().__init__()
        self.settings = settings
        w = settings.width
        self.unet = UNet2DModel(
            sample_size=settings.image_size, in_channels=3, out_channels=3,
            block_out_channels=(w, 2 * w), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=min(8, w), class_embed_type="identity",
        )
        time_dim = self.unet.config.block_out_channels[0] * 4
        self.labels = LabelEmbedding(settings.num_classes, settings.num_private, time_dim)
        self.privacy: dict[str, Any] | None = None  # what a DP training spent (train_generator with dp)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=self.labels(y, private)).sample

    def null_labels(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.full((n,), self.labels.null_class, device=device, dtype=torch.long),
                torch.full((n,), self.labels.null_private, device=device, dtype=torch.long))

    def conditioning(self, y: torch.Tensor, private: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class mode ignores the private label (always null)."""
        if not self.settings.uses_private:
            private = torch.full_like(private, self.labels.null_private)
        return y, private

    # ------------------------------------------------------------------ persistence (atomic folder)
    def save(self, folder: Path, meta: dict[str, Any]) -> None:
        """Write ``folder`` whole or not at all: a temporary sibling folder renamed into place
        (:func:`fairforget.storage.replace_dir`; :func:`fairforget.storage.recover_dir` puts the old one
        back should a crash fall between its two renames)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            self.unet.save_pretrained(tmp / "unet")
            torch.save({k: v.cpu() for k, v in self.labels.state_dict().items()}, tmp / "labels.pt")
            info = {"settings": asdict(self.settings), **meta}
            if self.privacy is not None:
                info["privacy"] = finite(self.privacy)
            (tmp / "generator.json").write_text(json.dumps(info, indent=2))
            replace_dir(tmp, folder)  # the old folder renamed aside, the new one in, the parent fsynced
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> tuple[ConditionalGenerator, dict[str, Any]]:
        folder = Path(folder)
        try:
            info = json.loads((folder / "generator.json").read_text())
            settings = GeneratorSettings(**{**info["settings"], "device": device})
            model = cls(settings)
            model.unet = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
            model.labels.load_state_dict(torch_load(folder / "labels.pt"))
            model.privacy = info.get("privacy")
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise GeneratorError(f"cannot load the generator in {folder}: {exc}") from None
        meta = {k: v for k, v in info.items() if k != "settings"}
        return model.to(device).eval(), meta


# ---------------------------------------------------------------------- training
def train_generator(x: torch.Tensor, y: torch.Tensor, private: torch.Tensor, settings: GeneratorSettings,
                    seed: int, progress: Callable[[int, float], None] | None = None,
                    dp: DPSettings | None = None, accountant: ShardAccountant | None = None) -> ConditionalGenerator:
    """Train a conditional DDPM on images ``x`` in [0, 1] with labels ``y`` / ``private``.

    With ``dp``: DP-SGD (:func:`_train_dp`), checked against and recorded into ``accountant``; the
    returned model's ``privacy`` says what its training spent."""
    if len(x) == 0:
        raise GeneratorError("no real samples to train the generator on")
    if dp is not None:
        if settings.group_reweight > 0:
            raise GeneratorError("group reweighting changes each sample's sampling rate, which the DP accountant "
                                 "does not model: use diffusion-group-reweight = 0 with dp")
        return _train_dp(x, y, private, settings, seed, progress, dp, accountant)
    model, device, scheduler, opt, sched = _setup(settings, seed)
    gen = torch.Generator().manual_seed(seed)
    weights = group_weights(y, private, settings) if settings.group_reweight > 0 else None
    data = (x * 2 - 1).to(device)
    y, private = y.to(device), private.to(device)
    ema = 0.0
    batch = min(settings.batch_size, len(data))
    for step in range(settings.train_steps):
        if weights is None:
            idx = torch.randint(0, len(data), (batch,), generator=gen).to(device)
        else:  # groups drawn by weight: the few bias-conflicting originals are seen as often as a common group
            idx = torch.multinomial(weights, batch, replacement=True, generator=gen).to(device)
        loss = _denoising_loss(model, model, scheduler, data[idx], y[idx], private[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        ema = value if step == 0 else 0.98 * ema + 0.02 * value
        if progress is not None:
            progress(step + 1, ema)
    return model.eval()


def group_weights(y: torch.Tensor, private: torch.Tensor, settings: GeneratorSettings) -> torch.Tensor:
    """Each sample's weight in the generator's batches, ``n_g ** -group_reweight`` with ``n_g`` the
    count of its group ((class, private) pair, or class in ``class`` mode) in the site's own data,
    normalised to sum to 1. A site knows its own labels, so it knows which groups are rare: at rho =
    0.99 the two or three bias-conflicting originals of a shard are its only evidence that a colour
    and a digit are separate factors, and with power 1 each present group weighs the same."""
    g = y.long() * settings.num_private + private.long() if settings.uses_private else y.long()
    counts = torch.bincount(g)
    w = counts[g].double().pow(-settings.group_reweight)
    return (w / w.sum()).float()


def _setup(settings: GeneratorSettings, seed: int) -> tuple[ConditionalGenerator, torch.device, DDPMScheduler,
                                                            torch.optim.Optimizer, Any]:
    """The seeded initial model (the global RNG left as it was), the noise schedule, AdamW and its
    warm-up + cosine learning-rate schedule."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = ConditionalGenerator(settings)
    torch.random.set_rng_state(gen_state)
    device = torch.device(settings.device)
    model.to(device).train()
    scheduler = DDPMScheduler(num_train_timesteps=settings.timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    lr_at = lambda step: min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / settings.train_steps))  # noqa: E731
    return model, device, scheduler, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _denoising_loss(model: ConditionalGenerator, forward: Callable[..., torch.Tensor], scheduler: DDPMScheduler,
                    x0: torch.Tensor, y: torch.Tensor, private: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MSE on the noise of one batch: a noise draw, a uniform timestep and each label factor's
    dropout per sample, in this order from ``gen``. ``forward`` is the model or its Opacus wrapper.
    The batch mean of per-sample means, so sample i's share of the gradient is its own loss's
    gradient / batch size (Opacus' ``loss_reduction="mean"``)."""
    s, device, n = model.settings, x0.device, len(x0)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, s.timesteps, (n,), generator=gen).to(device)
    # each factor is dropped on its own, so the network learns p(x | y), p(x | a) and p(x)
    drop_y = (torch.rand(n, generator=gen) < s.label_dropout).to(device)
    drop_a = (torch.rand(n, generator=gen) < s.label_dropout).to(device)
    null_y, null_a = model.null_labels(n, device)
    yy, aa = model.conditioning(y, private)
    yy = torch.where(drop_y, null_y, yy)
    aa = torch.where(drop_a, null_a, aa)
    return F.mse_loss(forward(scheduler.add_noise(x0, noise, t), t, yy, aa), noise)


# ---------------------------------------------------------------------- DP-SGD training
def generator_planned(n: int, settings: GeneratorSettings, dp: DPSettings) -> list[Entry]:
    """What DP training on ``n`` samples adds to the shard's accountant: ``train_steps`` Poisson
    steps at rate ``q = batch_size / n`` (empty batches included: each is a noise-only step)."""
    if n <= 0 or settings.train_steps <= 0:
        return []
    return [(dp.noise_multiplier, min(1.0, settings.batch_size / n), settings.train_steps)]


def check_dp_trainable(model: nn.Module) -> None:
    """Refuse, in one line, a generator Opacus cannot give per-sample gradients: a layer that mixes
    the samples of a batch (BatchNorm and the like, found by Opacus' ``ModuleValidator``).

    The UNet's self-attention block (``UNetMidBlock2D`` has one) is per sample: its parameters are
    ``Linear`` and ``GroupNorm`` layers, and attention runs over one image's pixels only, so it is
    trained with DP like the rest (its per-sample gradients are checked in the tests). Every
    trainable layer of the generator (``Conv2d``, ``Linear``, ``GroupNorm``, ``Embedding``) has an
    Opacus grad sampler; one without would get Opacus' functorch fallback for that layer alone.
    Whatever a layer gets, the first DP step checks that its per-sample gradients add up to the
    batch gradient (:func:`_verify_grad_samples`)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise GeneratorError(f"the generator cannot be trained with DP-SGD: {errors[0]}")


def per_sample_module(model: nn.Module) -> tuple[GradSampleModule, list[Any]]:
    """``model`` wrapped for per-sample gradients (Opacus' hooks mode, conv inputs made contiguous);
    the hook handles to remove, with ``GradSampleModule._close``, after training."""
    handles = _contiguous_conv_inputs(model)
    return GradSampleModule(model, batch_first=True, loss_reduction="mean"), handles


def _contiguous_conv_inputs(model: nn.Module) -> list[Any]:
    """Make every ``Conv2d`` input NCHW-contiguous (the same values): Opacus' conv grad sampler
    (``unfold2d``) reads its input through ``as_strided`` as if it were, and diffusers' attention
    block hands the next ResNet a channels-last view (``transpose(-1, -2).reshape``), for which the
    hooks' per-sample gradients of ``mid_block.resnets.1.conv1`` / ``conv2`` come out silently
    wrong. Returns the hook handles to remove."""
    def pre(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].contiguous(), *args[1:])

    return [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, nn.Conv2d)]


def _verify_grad_samples(model: nn.Module, batch: int) -> None:
    """Every trainable parameter has a per-sample gradient for each of the ``batch`` samples, and
    their mean is the batch gradient autograd computed (loss = batch mean); otherwise the per-sample
    clipping would bound the wrong thing and the guarantee would be void, so refuse."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        gs = getattr(p, "grad_sample", None)
        if not isinstance(gs, torch.Tensor) or gs.shape != (batch, *p.shape) or p.grad is None:
            raise GeneratorError(f"the generator cannot be trained with DP-SGD: Opacus computed no per-sample "
                                 f"gradient for {name}")
        err = float((gs.mean(0) - p.grad).norm())
        if err > 1e-3 * float(p.grad.norm()) + 1e-7:
            raise GeneratorError(f"the generator cannot be trained with DP-SGD: Opacus' per-sample gradients of "
                                 f"{name} do not add up to its batch gradient (relative error "
                                 f"{err / max(float(p.grad.norm()), 1e-12):.2g})")


def _train_dp(x: torch.Tensor, y: torch.Tensor, private: torch.Tensor, settings: GeneratorSettings, seed: int,
              progress: Callable[[int, float], None] | None, dp: DPSettings,
              accountant: ShardAccountant | None) -> ConditionalGenerator:
    """DP-SGD (Abadi et al. 2016) on the generator, so the model and everything sampled from it are
    (epsilon, delta)-DP with respect to each real sample.

    Each step draws a Poisson batch (every real sample independently with probability ``q =
    batch_size / n``), computes per-sample gradients with Opacus (``GradSampleModule``, hooks mode:
    every layer has a grad sampler), and Opacus' ``DPOptimizer`` wrapping the same AdamW clips each
    sample's gradient to ``dp.max_grad_norm`` and adds ``N(0, (noise_multiplier max_grad_norm)^2)``;
    no global clipping on top. Timesteps, noise and label dropout are drawn per sample as without DP
    (they are part of that sample's loss); an empty Poisson batch is a noise-only step (the
    mechanism the accountant analyses), counted like any other. The check against
    ``dp.max_epsilon`` comes first (nothing is built or trained past the cap); the spend is recorded
    only after training completes.

    The Poisson masks and the Gaussian noise come from generators seeded afresh from the operating
    system's secure randomness at the site (:func:`fairforget.site_secret.secure_seed`), never from
    the run's public ``seed``: whoever knows the run config (the server, another site) cannot
    regenerate the noise, so the guarantee holds against them. A generator is not replayed (a
    deletion retrains it from scratch without the record); the per-sample draws of the diffusion
    loss (noise, timestep, label dropout) are data-independent and stay seeded by ``seed``.

    Out of scope of the guarantee (the caller's business): the per-group counts a node asks the
    generator for are planned from its live data's counts. Classifier guidance at sampling time is
    post-processing: the fidelity classifiers are the server's, trained on the held-out split, which
    no shard trains on (:mod:`fairforget.diffusion.quality`)."""
    n = len(x)
    planned = generator_planned(n, settings, dp)
    if accountant is not None:
        accountant.check(planned, dp.max_epsilon, "generator training")
    model, device, scheduler, opt, sched = _setup(settings, seed)
    check_dp_trainable(model)
    q = planned[0][1]
    gen = torch.Generator().manual_seed(seed)  # per-sample draws: noise, timestep, label dropout
    poisson = torch.Generator().manual_seed(secure_seed())  # secret to the site: see the docstring
    dp_noise = None if dp.secure_mode else torch.Generator(device=device).manual_seed(secure_seed())
    gsm, handles = per_sample_module(model)
    dp_opt = DPOptimizer(opt, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                         expected_batch_size=max(1, round(n * q)), loss_reduction="mean", generator=dp_noise,
                         secure_mode=dp.secure_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    data = (x * 2 - 1).to(device)
    y, private = y.to(device), private.to(device)
    ema, verified, empty = 0.0, False, 0  # verified: per-sample gradients checked (first non-empty batch)
    try:
        for step in range(settings.train_steps):
            idx = torch.nonzero(torch.rand(n, generator=poisson) < q).flatten().to(device)
            dp_opt.zero_grad(set_to_none=True)
            if len(idx):
                loss = _denoising_loss(model, gsm, scheduler, data[idx], y[idx], private[idx], gen)
                loss.backward()
                if not verified:
                    _verify_grad_samples(model, len(idx))
                    verified = True
                value = float(loss.detach())
                ema = value if step == empty else 0.98 * ema + 0.02 * value  # the first loss starts it
            else:  # nobody sampled: no per-sample gradient, the step is noise only
                empty += 1
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            dp_opt.step()
            sched.step()
            if progress is not None:
                progress(step + 1, ema)
    finally:
        for h in handles:
            h.remove()
        gsm._close()
        for p in params:
            p.grad = None
    if accountant is not None:
        accountant.record(planned)
    model.privacy = {
        "dp": True, "noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "sample_rate": q,
        "steps": settings.train_steps, "empty_batches": empty, "accountant": dp.accountant,
        "epsilon": epsilon_of(dp.accountant, planned, dp.delta), "delta": dp.delta,
        "grad_sample_mode": "hooks", "secure_mode": dp.secure_mode,
    }
    return model.eval()


# ---------------------------------------------------------------------- sampling
@torch.no_grad()
def _guided_eps(model: ConditionalGenerator, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                private: torch.Tensor, w: float, w_private: float | None = None) -> torch.Tensor:
    """Classifier-free guidance. With two factors it is compositional (Liu et al. 2022):
    ``eps = eps(0) + w (eps(y, 0) - eps(0)) + w_a (eps(0, a) - eps(0))`` (``w_a = w`` unless
    ``w_private`` is given); each term is a conditional the network was trained on even when the pair
    (y, a) never occurred in the shard."""
    ny, na = model.null_labels(len(x), x.device)
    w_a = w if w_private is None else w_private
    if w == 0.0 and (w_a == 0.0 or not model.settings.uses_private):
        return model(x, t, ny, na)
    if not model.settings.uses_private:
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, ny]), torch.cat([na, na]))
        cond, uncond = both.chunk(2)
        return uncond + w * (cond - uncond)
    three = model(torch.cat([x, x, x]), torch.cat([t, t, t]), torch.cat([y, ny, ny]), torch.cat([na, private, na]))
    cond_y, cond_a, uncond = three.chunk(3)
    return uncond + w * (cond_y - uncond) + w_a * (cond_a - uncond)


def sample(model: ConditionalGenerator, y: torch.Tensor, private: torch.Tensor, seed: int, *,
           ddim_steps: int | None = None, guidance_scale: float | None = None, batch_size: int = 256,
           classifier: Callable[[torch.Tensor], torch.Tensor] | None = None, classifier_scale: float | None = None,
           private_scale: float | None = None) -> torch.Tensor:
    """Images in [0, 1] for labels ``(y, private)``, DDIM with classifier-free guidance.

    ``classifier`` (optional) maps clean images in [0, 1] to class logits; with ``classifier_scale``
    > 0 its gradient guides every step towards ``y``. ``private_scale`` weighs the private factor's
    guidance apart from the class factor's (default: the same scale; ``simulations/composition.py``)."""
    s = model.settings
    steps = s.ddim_steps if ddim_steps is None else ddim_steps
    w = s.guidance_scale if guidance_scale is None else guidance_scale
    cs = s.classifier_scale if classifier_scale is None else classifier_scale
    device = next(model.parameters()).device
    # "trailing" spacing starts at the last training timestep (pure noise; Lin et al. 2024)
    scheduler = DDIMScheduler(num_train_timesteps=s.timesteps, clip_sample=True, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    out = []
    for b, start in enumerate(range(0, len(y), batch_size)):
        yb, ab = y[start : start + batch_size].to(device), private[start : start + batch_size].to(device)
        gen = torch.Generator().manual_seed((seed + 1_000_003 * b) % (1 << 63))
        x = torch.randn((len(yb), 3, s.image_size, s.image_size), generator=gen).to(device)
        for t in scheduler.timesteps:
            tt = torch.full((len(yb),), int(t), device=device, dtype=torch.long)
            eps = _guided_eps(model, x, tt, yb, ab, w, private_scale)
            if classifier is not None and cs > 0:
                abar = float(scheduler.alphas_cumprod[int(t)])
                eps = eps - cs * math.sqrt(1 - abar) * _classifier_grad(classifier, x, eps, abar, yb)
            x = scheduler.step(eps, t, x, eta=s.ddim_eta, generator=gen).prev_sample
        out.append(((x.clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out) if out else torch.empty(0, 3, s.image_size, s.image_size)


def _classifier_grad(classifier: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: torch.Tensor,
                     abar: float, y: torch.Tensor) -> torch.Tensor:
    """``grad_x log p(y | x0_hat(x))`` with ``x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar)``."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = ((xg - math.sqrt(1 - abar) * eps.detach()) / math.sqrt(abar)).clamp(-1, 1)
        logp = F.log_softmax(classifier((x0 + 1) / 2), dim=1)
        chosen = logp.gather(1, y.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(chosen, xg)
    return grad

