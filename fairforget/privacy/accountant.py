"""A shard's cumulative privacy spend: every DP-SGD training that touched its data, composed.

:class:`ShardAccountant` keeps the history an Opacus accountant keeps (``(noise multiplier, sample
rate, steps)`` per training), in Opacus' ``state_dict`` form, and computes (epsilon, delta) with the
chosen Opacus accountant (``prv``, ``rdp``) or through mu-GDP (``gdp``: the CLT mu of every entry,
composed in quadrature, then converted; Opacus' own GDP accountant takes one constant rate only, and
SISA's stages differ in size). It lives in the node's state folder beside the SISA checkpoints
(``STATE/privacy.json``), is restored on every message and saved, before the checkpoint, after every
training: a crash can over-count the spend, never under-count it.

The hard stop: :meth:`ShardAccountant.check` is called with the entries a training is about to
add; if the shard's epsilon would pass ``dp-max-epsilon`` it raises :class:`PrivacyBudgetExceeded`
and the caller trains nothing and changes nothing.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fairforget.privacy.gdp import Entry, epsilon_of_mu, mu_of, tpr_bound
from fairforget.storage import atomic_write_json, read_json

ACCOUNTANTS = ("prv", "rdp", "gdp")
PRV_EPS_ERROR = 0.05  # PRV's reported epsilon is an upper estimate within this of the true one
PRV_LIMIT = 100.0  # past this RDP epsilon the PRV accountant is not asked (its grid would not fit in memory)
BOUND_FPRS = (0.001, 0.01)  # where the report puts the mu-GDP bound beside the empirical TPR


class PrivacyBudgetExceeded(ValueError):
    """A training that would take a shard past its epsilon cap; one line for the user."""


def epsilon_of(accountant: str, history: Sequence[Entry], delta: float) -> float:
    """(epsilon at ``delta``) of ``history`` with the named accountant (memoised: the same history
    is asked for by the hard stop, the reply and the report)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return _epsilon(accountant, tuple((float(s), float(q), int(t)) for s, q, t in history if int(t) > 0),
                    float(delta))


RDP_ORDERS = RDPAccountant.DEFAULT_ALPHAS


@functools.lru_cache(maxsize=1024)
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    """Renyi DP of one sampled-Gaussian step at every order (what Opacus' RDP accountant sums)."""
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS))


@functools.lru_cache(maxsize=4096)
def _epsilon(accountant: str, history: tuple[Entry, ...], delta: float) -> float:
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    if accountant == "gdp":
        return epsilon_of_mu(mu_of(history), delta)
    curve = sum(steps * _rdp_curve(sigma, q) for sigma, q, steps in history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": far from any useful epsilon
        eps_rdp = float(rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=curve, delta=delta)[0])
    if accountant == "rdp" or eps_rdp > PRV_LIMIT:
        return eps_rdp  # PRV is tighter, but its grid explodes where the privacy loss is huge
    prv = create_accountant(mechanism="prv")
    prv.history = list(history)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return min(eps_rdp, float(prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)))
    except (ValueError, RuntimeError, OverflowError, MemoryError):
        return eps_rdp


def summarize(history: Sequence[Entry], accountant: str, delta: float) -> dict[str, Any]:
    """epsilon, mu and the mu-GDP bound on any membership attack's TPR at the report's FPRs."""
    mu = mu_of(history)
    return {
        "accountant": accountant,
        "epsilon": epsilon_of(accountant, history, delta),
        "delta": delta,
        "mu": mu,
        "tpr_bound": {f"{fpr:g}": tpr_bound(mu, fpr) for fpr in BOUND_FPRS},
        "steps": int(sum(t for _, _, t in history)),
        "trainings": len(history),
    }


@dataclass
class ShardAccountant:
    shard: int
    accountant: str = "prv"
    delta: float = 1e-5
    history: list[Entry] = field(default_factory=list)

    FILE = "privacy.json"

    # ------------------------------------------------------------------ figures
    def epsilon(self, extra: Iterable[Entry] = ()) -> float:
        return epsilon_of(self.accountant, [*self.history, *extra], self.delta)

    def mu(self, extra: Iterable[Entry] = ()) -> float:
        return mu_of([*self.history, *extra])

    def summary(self) -> dict[str, Any]:
        return {"shard": self.shard, **summarize(self.history, self.accountant, self.delta)}

    # ------------------------------------------------------------------ the hard stop
    def check(self, planned: Sequence[Entry], cap: float, what: str = "this training") -> None:
        """Raise :class:`PrivacyBudgetExceeded` if ``planned`` would take the shard past ``cap``."""
        if not planned:
            return
        after = self.epsilon(planned)
        if after > cap:
            raise PrivacyBudgetExceeded(
                f"shard {self.shard}: DP budget exhausted: epsilon spent {self.epsilon():.3f} of dp-max-epsilon "
                f"{cap:g}; {what} ({sum(t for _, _, t in planned)} DP-SGD steps) would take it to {after:.3f} "
                f"(delta {self.delta:g}); nothing was trained or changed")

    def record(self, entries: Iterable[Entry]) -> None:
        self.history.extend((float(s), float(q), int(t)) for s, q, t in entries if int(t) > 0)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Opacus' accountant ``state_dict`` (``history``, ``mechanism``) plus shard and delta."""
        return {"mechanism": self.accountant, "history": [list(e) for e in self.history], "shard": self.shard,
                "delta": self.delta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["shard"]) != self.shard:
            raise ValueError(f"privacy state of shard {state['shard']} loaded into shard {self.shard}")
        if str(state["mechanism"]) != self.accountant:
            raise ValueError(f"shard {self.shard}: privacy spent so far was accounted with {state['mechanism']!r}; "
                             f"dp-accountant cannot change to {self.accountant!r} in the middle of a run")
        self.history = [(float(s), float(q), int(t)) for s, q, t in state["history"]]

    def save(self, state_dir: Path) -> None:
        atomic_write_json(Path(state_dir) / self.FILE, self.state_dict())

    @classmethod
    def load(cls, state_dir: Path, shard: int, accountant: str, delta: float) -> ShardAccountant:
        acc = cls(shard, accountant, delta)
        path = Path(state_dir) / cls.FILE
        if path.is_file():
            acc.load_state_dict(read_json(path))
        return acc
