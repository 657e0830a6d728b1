"""Certified (eps, delta)-unlearning of the linear head by one noisy Newton step (Sekhari, Acharya,
Kamath, Suresh, NeurIPS 2021, Algorithm 2; Guo et al. 2020 for the softmax head).

The convex case: the unlearned part is the head ``fc`` on fixed bottleneck features ``phi(x)``; the
encoder is left as it is. Its certificate therefore covers the head only; the encoder still carries
the deleted samples' influence (the encoder's budget is heuristic, :mod:`fairforget.capacity`).

1. Features. ``phi`` from the model before the deletion (eval mode), for the n samples it was
   trained on (retained + forget set). Rescale to ``x = [phi / R, 1]`` with R the largest feature
   norm, so ``||x|| <= sqrt 2``; the head ``W phi + b`` is ``theta x`` with ``theta = [R W, b]``
   (the same function, in coordinates where the Lipschitz constants are fixed).
2. Loss per sample ``f(theta, z) = CE(theta x, y) + lambda / 2 ||theta||^2`` (``newton-lambda``):
   lambda-strongly convex, L-Lipschitz with ``L = sqrt 2 * sqrt 2 = 2`` (the CE gradient is
   ``(p - e_y) x^T`` and ``||p - e_y|| <= sqrt 2``; the regulariser's share is left out as in the
   paper's bounded domain), Hessian ``(diag p - p p^T) (x) x x^T + lambda I`` with Lipschitz
   constant ``M = ||x||^3 = 2 sqrt 2`` (the third derivative of log-sum-exp is bounded by 1; our
   constant, stated as an assumption).
3. Newton step (NOTES.md section 2), U the forget set, m = |U|:
   ``H_hat = (n H - sum_U hess f) / (n - m)`` = the mean Hessian over the retained samples;
   ``theta_bar = theta + H_hat^-1 sum_U grad f(theta, z) / (n - m)``.
4. Noise: ``theta_bar + N(0, sigma^2 I)`` with ``gamma' = 2 M m^2 L^2 / (lambda^2 n^2)`` and
   ``sigma = (gamma' / eps) sqrt(2 ln(1.25 / delta))`` (:func:`newton_sigma`).

The Hessian is computed at unlearning time from the model before the deletion (our ``fairforget/sisa.py``
stores no Hessian at training time). Since the model before the deletion is exactly the one training
produced (or the previous request's output), this equals storing it then; it costs one forward pass
over the shard and a d x d solve (d = 650 at the default width). Each request is one (eps, delta)
step on the current model; successive requests compose, which is what the deletion budget counts.
The theorem assumes the head is the regularised empirical risk minimiser; SISA's Adam training
(no ``lambda``) only approximates that.
"""

from __future__ import annotations

import math

import torch

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet
from fairforget.sisa import SisaShard
from fairforget.unlearning.approximate import UnlearnParams, approximate
from fairforget.unlearning.approximate import check as check_approximate
from fairforget.unlearning.result import UnlearnResult

NAME = "newton"
X_NORM = math.sqrt(2.0)  # bound on ||x|| after rescaling
LIPSCHITZ = math.sqrt(2.0) * X_NORM  # L
HESSIAN_LIPSCHITZ = X_NORM**3  # M


def newton_sigma(eps: float, delta: float, m: int, n: int, lam: float,
                 lipschitz: float = LIPSCHITZ, hessian_lipschitz: float = HESSIAN_LIPSCHITZ) -> float:
    """``sigma = (gamma' / eps) sqrt(2 ln(1.25 / delta))``, ``gamma' = 2 M m^2 L^2 / (lambda^2 n^2)``."""
    if not (eps > 0 and 0 < delta < 1 and lam > 0 and 0 <= m < n):
        raise ValueError(f"need eps > 0, 0 < delta < 1, lambda > 0, 0 <= m < n; got {eps}, {delta}, {lam}, {m}, {n}")
    gamma = 2.0 * hessian_lipschitz * m**2 * lipschitz**2 / (lam**2 * n**2)
    return gamma / eps * math.sqrt(2.0 * math.log(1.25 / delta))


@torch.no_grad()
def _features(model: SimpleConvNet, data: SampleSet, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.features(data.x[i : i + batch_size].to(device)).double().cpu()
                      for i in range(0, len(data), batch_size)])


def _hessian_sum(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``sum_i (diag p_i - p_i p_i^T) (x) x_i x_i^T`` as a (K D) x (K D) matrix, theta row-major (K, D)."""
    k, dim = probs.shape[1], x.shape[1]
    a = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (N, K, K)
    h = torch.empty(k, dim, k, dim, dtype=x.dtype)
    for r in range(k):
        for c in range(k):
            h[r, :, c, :] = (x * a[:, r, c, None]).T @ x
    return h.reshape(k * dim, k * dim)


def newton_step(theta: torch.Tensor, x_retain: torch.Tensor, y_retain: torch.Tensor, x_forget: torch.Tensor,
                y_forget: torch.Tensor, lam: float) -> torch.Tensor:
    """``theta + H_hat^-1 sum_U grad f / (n - m)`` for the regularised softmax head ``theta`` (K, D)."""
    n_r = len(x_retain)
    p_r = torch.softmax(x_retain @ theta.T, 1)
    h_hat = _hessian_sum(x_retain, p_r) / n_r + lam * torch.eye(theta.numel(), dtype=theta.dtype)
    p_f = torch.softmax(x_forget @ theta.T, 1)
    resid = p_f - torch.nn.functional.one_hot(y_forget, theta.shape[0]).to(theta.dtype)
    grad_u = resid.T @ x_forget + len(x_forget) * lam * theta  # sum_U grad f, (K, D)
    step = torch.linalg.solve(h_hat, grad_u.reshape(-1) / n_r)
    return theta + step.reshape(theta.shape)


def _method(model: SimpleConvNet, retain: SampleSet, forget: SampleSet, params: UnlearnParams,
            shard: SisaShard, seed: int) -> dict[str, float]:
    phi_r, phi_f = _features(model, retain), _features(model, forget)
    radius = float(torch.cat([phi_r, phi_f]).norm(dim=1).max().clamp(min=1e-12))

    def scaled(phi: torch.Tensor) -> torch.Tensor:
        return torch.cat([phi / radius, torch.ones(len(phi), 1, dtype=phi.dtype)], 1)

    w, b = model.fc.weight.detach().double().cpu(), model.fc.bias.detach().double().cpu()
    theta = torch.cat([w * radius, b[:, None]], 1)
    theta_bar = newton_step(theta, scaled(phi_r), retain.y, scaled(phi_f), forget.y, params.newton_lambda)
    n, m = len(retain) + len(forget), len(forget)
    sigma = newton_sigma(params.eps, params.delta, m, n, params.newton_lambda)
    gen = torch.Generator().manual_seed(seed)
    noisy = theta_bar + sigma * torch.randn(theta_bar.shape, generator=gen, dtype=theta_bar.dtype)
    with torch.no_grad():
        model.fc.weight.copy_((noisy[:, :-1] / radius).to(model.fc.weight))
        model.fc.bias.copy_(noisy[:, -1].to(model.fc.bias))
    return {"noise_sigma": sigma, "newton_step_norm": float((theta_bar - theta).norm()), "feature_radius": radius}


def check(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> None:
    """What can refuse this deletion, checked before anything is written (:func:`check_approximate`)."""
    check_approximate(NAME, shard, ids, params, dp_epochs=0)  # no training: a noisy closed-form step


def unlearn(shard: SisaShard, ids: list[int], params: UnlearnParams | None = None) -> UnlearnResult:
    return approximate(NAME, _method, shard, ids, params, dp_epochs=0)
