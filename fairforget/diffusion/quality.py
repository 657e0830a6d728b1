"""Quality of synthetic samples: label fidelity and a Frechet distance on classifier features.

Inception weights cannot be downloaded here (no model hub), so the Frechet distance is computed on
the bottleneck of the project's own classifiers (SimpleConvNet), trained on real held-out data:
an "FID" in spirit, not comparable with published FID values.

Two fidelity classifiers, both trained by the server on the held-out split (real data no shard model
trains on) and sent to the clients:

- the *target* classifier sees a colour-free view of each image (grayscale, each image min-max
  normalised), so it cannot read the colour shortcut of Biased-MNIST-style data and judges the
  digit itself (on held-out data at rho = 0.99 an RGB classifier would label by colour);
- the *private* classifier sees the RGB image and predicts the private attribute.

Label fidelity is the fraction of generated samples whose predicted class (private attribute) is the
one the generator was asked for; the classifiers' own accuracy on the unbiased test set is reported
beside it as the ceiling.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet, build_model
from fairforget.objectives import Objective
from fairforget.training import Batch, OptimizerSpec, train

FIDELITY_WIDTH = 8
FIDELITY_EPOCHS = 40
NOISE = 0.3  # largest pixel-noise sigma of the training augmentation


def shape_view(x: torch.Tensor) -> torch.Tensor:
    """Grayscale, each image min-max normalised to [0, 1], repeated to 3 channels."""
    g = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    lo = g.amin(dim=(2, 3), keepdim=True)
    hi = g.amax(dim=(2, 3), keepdim=True)
    return ((g - lo) / (hi - lo).clamp_min(1e-6)).repeat(1, 3, 1, 1)


class FidelityClassifiers:
    """The target (colour-free view) and private (RGB) classifiers."""

    def __init__(self, target: SimpleConvNet, private: SimpleConvNet) -> None:
        self.target = target.eval()
        self.private = private.eval()

    @classmethod
    def train(cls, data: SampleSet, num_classes: int, num_private: int, seed: int,
              epochs: int = FIDELITY_EPOCHS) -> FidelityClassifiers:
        target = _fit(data, "y", num_classes, seed, epochs, view=shape_view)
        private = _fit(data, "private", num_private, seed + 1, epochs)
        return cls(target, private)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"target.{k}": v for k, v in self.target.state_dict().items()}
        out.update({f"private.{k}": v for k, v in self.private.state_dict().items()})
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], num_classes: int, num_private: int) -> FidelityClassifiers:
        target = build_model(num_classes, FIDELITY_WIDTH, seed=0)
        private = build_model(num_private, FIDELITY_WIDTH, seed=0)
        target.load_state_dict({k[len("target."):]: v for k, v in state.items() if k.startswith("target.")})
        private.load_state_dict({k[len("private."):]: v for k, v in state.items() if k.startswith("private.")})
        return cls(target, private)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target(shape_view(x)).argmax(1), self.private(x).argmax(1)

    def target_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable logits of the target classifier (classifier guidance)."""
        return self.target(shape_view(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        """Both bottlenecks side by side: what the Frechet distance compares."""
        return torch.cat([self.target.features(shape_view(x)), self.private.features(x)], 1).double().numpy()

    def fidelity(self, x: torch.Tensor, y: torch.Tensor, private: torch.Tensor | None) -> dict[str, float]:
        pred_y, pred_a = self.predict(x)
        out = {"class": float((pred_y == y).float().mean()) if len(y) else float("nan")}
        if private is not None:  # "both": the sample shows the requested class and the requested private value
            out["private"] = float((pred_a == private).float().mean()) if len(y) else float("nan")
            out["both"] = float(((pred_y == y) & (pred_a == private)).float().mean()) if len(y) else float("nan")
        return out

    def accuracy(self, data: SampleSet) -> dict[str, float]:
        """The classifiers' accuracy on real data (the ceiling of label fidelity)."""
        return self.fidelity(data.x, data.y, data.private)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Heusel et al. 2017)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1]) * 1e-6  # keeps the product's square root defined for rank-deficient covariances
    cov_a, cov_b = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean))


class NoisyViewCE(Objective):
    """Cross-entropy on ``view(noisy x)`` for the target (``y``) or the private label: Gaussian pixel
    noise (sigma uniform in [0, NOISE]) and a random brightness shift make the classifier judge a
    sample's class or attribute, not whether its pixels are as clean as real ones (the Frechet
    distance measures that)."""

    name = "noisy-view-cross-entropy"

    def __init__(self, label: str, seed: int, view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        nn.Module.__init__(self)
        self.label, self.view = label, view
        self.gen = torch.Generator().manual_seed(seed)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        n = len(batch)
        sigma = torch.rand(n, 1, 1, 1, generator=self.gen) * NOISE
        shift = (torch.rand(n, 1, 1, 1, generator=self.gen) - 0.5) * 0.2
        noise = sigma * torch.randn(batch.x.shape, generator=self.gen) + shift
        xb = (batch.x + noise.to(batch.x.device)).clamp(0, 1)
        return F.cross_entropy(model(self.view(xb) if self.view else xb), getattr(batch, self.label))


def _fit(data: SampleSet, label: str, num_classes: int, seed: int, epochs: int,
         view: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SimpleConvNet:
    """Adam (lr 3e-3, batches of 64) on :class:`NoisyViewCE`, through the training engine."""
    model = build_model(num_classes, FIDELITY_WIDTH, seed=seed)
    train(model, data, seeds=[seed + 1 + e for e in range(epochs)], batch_size=64,
          objective=NoisyViewCE(label, seed, view), optimizer=OptimizerSpec(lr=3e-3).build(model))
    return model.eval()
