"""LiRA, the likelihood-ratio attack (Carlini et al., "Membership Inference Attacks From First
Principles", IEEE S&P 2022).

1. For each candidate x and model f, the statistic ``phi = log p_y - log sum_{k != y} p_k``
   (:func:`fairforget.audit.signals.lira_statistic`) is close to Gaussian over models.
2. Online: fit N(mu_in, s_in^2) on the references trained WITH x and N(mu_out, s_out^2) on those
   WITHOUT; score = log N(phi_target; mu_in, s_in) - log N(phi_target; mu_out, s_out).
3. Offline: only OUT references; one-sided test, score = log Phi((phi_target - mu_out) / s_out).
4. Fixed variance (the default): one global s for all candidates (per side), estimated from every
   candidate's residuals, more stable with few references (Carlini et al. Sec. VI): a site trains 2
   to 16. ``attack-options = {"lira-online": {"fixed-variance": false}}`` (or ``"lira-offline"``)
   fits each candidate's own s instead, their choice with 64 or more references.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from fairforget.audit.base import Attack, AuditError, TargetOutputs
from fairforget.audit.references import ReferenceOutputs
from fairforget.audit.signals import lira_statistic

MIN_STD = 1e-3


def _moments(phi: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-candidate mean and std of ``phi`` (M, N) over the references where ``mask`` is True; with
    ``fixed_variance`` one pooled std, ``sqrt(sum(resid^2) / (count - N))`` (each candidate's mean one
    degree of freedom), else each candidate's sample std (``count - 1`` degrees of freedom)."""
    count = mask.sum(0)
    if (count == 0).any():
        raise AuditError("LiRA: some candidates have no IN or no OUT reference model; train more references")
    mean = np.where(mask, phi, 0.0).sum(0) / count
    resid = np.where(mask, phi - mean, 0.0)
    if fixed_variance:
        std = np.full_like(mean, np.sqrt((resid**2).sum() / max(mask.sum() - mask.shape[1], 1)))
    else:
        std = np.sqrt((resid**2).sum(0) / np.maximum(count - 1, 1))
    return mean, np.maximum(std, MIN_STD)


class LiraOffline(Attack):
    name = "lira-offline"
    reference_mode = "offline"
    min_references = 2
    options = {"fixed-variance": True}  # attack-options; False: per-candidate variance

    def scores(self, target: TargetOutputs, refs: ReferenceOutputs | None) -> np.ndarray:
        self.check(refs)
        phi_ref = lira_statistic(refs.cand_probs, target.y)
        mu_out, s_out = _moments(phi_ref, ~refs.in_mask, bool(self.options["fixed-variance"]))
        phi = lira_statistic(target.cand_probs, target.y)
        return norm.logcdf((phi - mu_out) / s_out)


class LiraOnline(Attack):
    name = "lira-online"
    reference_mode = "online"
    min_references = 4
    options = {"fixed-variance": True}  # attack-options; False: per-candidate variance

    def scores(self, target: TargetOutputs, refs: ReferenceOutputs | None) -> np.ndarray:
        self.check(refs)
        phi_ref = lira_statistic(refs.cand_probs, target.y)
        mu_in, s_in = _moments(phi_ref, refs.in_mask, bool(self.options["fixed-variance"]))
        mu_out, s_out = _moments(phi_ref, ~refs.in_mask, bool(self.options["fixed-variance"]))
        phi = lira_statistic(target.cand_probs, target.y)
        return norm.logpdf(phi, mu_in, s_in) - norm.logpdf(phi, mu_out, s_out)
