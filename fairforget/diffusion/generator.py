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
from torch import nn

from fairforget.storage import torch_load


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
    device: str = "cpu"

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, num_private: int) -> GeneratorSettings:
        return cls(
            image_size=cfg.image_size, num_classes=num_classes, num_private=num_private,
            groups=cfg.augment_groups, width=cfg.diffusion_width, train_steps=cfg.diffusion_train_steps,
            batch_size=cfg.diffusion_batch_size, lr=cfg.diffusion_lr, timesteps=cfg.diffusion_timesteps,
            label_dropout=cfg.label_dropout, ddim_steps=cfg.ddim_steps, ddim_eta=cfg.ddim_eta,
            guidance_scale=cfg.guidance_scale,
            classifier_scale=cfg.classifier_guidance, device=cfg.torch_device(),
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
        """Write ``folder`` whole or not at all: a temporary sibling folder renamed into place."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            self.unet.save_pretrained(tmp / "unet")
            torch.save({k: v.cpu() for k, v in self.labels.state_dict().items()}, tmp / "labels.pt")
            (tmp / "generator.json").write_text(json.dumps({"settings": asdict(self.settings), **meta}, indent=2))
            old = folder.with_name(f".{folder.name}.old")
            if folder.exists():
                folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
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
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise GeneratorError(f"cannot load the generator in {folder}: {exc}") from None
        meta = {k: v for k, v in info.items() if k != "settings"}
        return model.to(device).eval(), meta


# ---------------------------------------------------------------------- training
def train_generator(x: torch.Tensor, y: torch.Tensor, private: torch.Tensor, settings: GeneratorSettings,
                    seed: int, progress: Callable[[int, float], None] | None = None) -> ConditionalGenerator:
    """Train a conditional DDPM on images ``x`` in [0, 1] with labels ``y`` / ``private``."""
    if len(x) == 0:
        raise GeneratorError("no real samples to train the generator on")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = ConditionalGenerator(settings)
    torch.random.set_rng_state(gen_state)
    device = torch.device(settings.device)
    model.to(device).train()
    scheduler = DDPMScheduler(num_train_timesteps=settings.timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    lr_at = lambda step: min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / settings.train_steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    data = (x * 2 - 1).to(device)
    y, private = y.to(device), private.to(device)
    null_y, null_a = model.null_labels(len(x), device)
    ema = 0.0
    for step in range(settings.train_steps):
        idx = torch.randint(0, len(data), (min(settings.batch_size, len(data)),), generator=gen).to(device)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, settings.timesteps, (len(idx),), generator=gen).to(device)
        # each factor is dropped on its own, so the network learns p(x | y), p(x | a) and p(x)
        drop_y = (torch.rand(len(idx), generator=gen) < settings.label_dropout).to(device)
        drop_a = (torch.rand(len(idx), generator=gen) < settings.label_dropout).to(device)
        yy, aa = model.conditioning(y[idx], private[idx])
        yy = torch.where(drop_y, null_y[: len(idx)], yy)
        aa = torch.where(drop_a, null_a[: len(idx)], aa)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t, yy, aa), noise)
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


# ---------------------------------------------------------------------- sampling
@torch.no_grad()
def _guided_eps(model: ConditionalGenerator, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                private: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance. With two factors it is compositional (Liu et al. 2022):
    ``eps = eps(0) + w (eps(y, 0) - eps(0)) + w (eps(0, a) - eps(0))``; each term is a conditional the
    network was trained on even when the pair (y, a) never occurred in the shard."""
    ny, na = model.null_labels(len(x), x.device)
    if w == 0.0:
        return model(x, t, ny, na)
    if not model.settings.uses_private:
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, ny]), torch.cat([na, na]))
        cond, uncond = both.chunk(2)
        return uncond + w * (cond - uncond)
    three = model(torch.cat([x, x, x]), torch.cat([t, t, t]), torch.cat([y, ny, ny]), torch.cat([na, private, na]))
    cond_y, cond_a, uncond = three.chunk(3)
    return uncond + w * (cond_y - uncond) + w * (cond_a - uncond)


def sample(model: ConditionalGenerator, y: torch.Tensor, private: torch.Tensor, seed: int, *,
           ddim_steps: int | None = None, guidance_scale: float | None = None, batch_size: int = 256,
           classifier: Callable[[torch.Tensor], torch.Tensor] | None = None, classifier_scale: float | None = None,
           ) -> torch.Tensor:
    """Images in [0, 1] for labels ``(y, private)``, DDIM with classifier-free guidance.

    ``classifier`` (optional) maps clean images in [0, 1] to class logits; with ``classifier_scale``
    > 0 its gradient guides every step towards ``y``."""
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
            eps = _guided_eps(model, x, tt, yb, ab, w)
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

