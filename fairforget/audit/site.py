"""A site's own audit (deployment): the ensemble against the site's members and held-out data.

The server sends the ensemble's weights; the site scores its own live members against its own
held-out non-members with the reference-free attacks and returns only ROC statistics (AUC,
TPR at low FPR, the curve), never samples, scores or ids. Reference-based attacks need population
data a site may not be able to spare; they run on the server's side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fairforget.audit import ATTACKS, TargetOutputs
from fairforget.audit.references import predict_probs
from fairforget.audit.roc import summarize
from fairforget.data.base import SampleSet


def reference_free(names: list[str]) -> list[str]:
    return [n for n in names if ATTACKS[n].reference_mode is None]


def site_audit(models: list[torch.nn.Module], members: SampleSet, nonmembers: SampleSet, attacks: list[str],
               bootstrap: int, seed: int) -> dict[str, Any]:
    if len(members) == 0 or len(nonmembers) == 0:
        return {"skipped": f"{len(members)} members, {len(nonmembers)} held-out samples at this site"}
    cand = SampleSet.concat([members, nonmembers])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    empty = np.zeros((0, 1))
    target = TargetOutputs(predict_probs(models, cand.x), cand.y.numpy(), empty, np.zeros(0, dtype=np.int64))
    return {name: summarize(ATTACKS[name]().scores(target, None), is_member, bootstrap=bootstrap, seed=seed)
            for name in reference_free(attacks)}
