"""Attribute inference with a linear probe (Barbano et al., "Bridging the gap between debiasing and
privacy for deep learning", ICCVW 2021, Sec. 3).

Freeze the encoder, train ``Linear(bottleneck, n_private)`` to predict the private attribute from
the bottleneck on strongly biased data (SGD, lr 0.01, 50 epochs, on standardised features), and
report its accuracy on the unbiased test set next to chance (1 / n_private). A model whose
bottleneck carries the private attribute lets the probe succeed even where the attribute is
independent of the label.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fairforget.data.base import SampleSet


@torch.no_grad()
def bottleneck(models: list[torch.nn.Module], x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Concatenated bottleneck features of ``models`` (an ensemble's joint representation)."""
    feats = []
    for model in models:
        model.eval()
        feats.append(torch.cat([model.features(x[i : i + batch]) for i in range(0, len(x), batch)]))
    return torch.cat(feats, dim=1)


def linear_probe(train_x: torch.Tensor, train_a: torch.Tensor, test_x: torch.Tensor, test_a: torch.Tensor,
                 num_private: int, *, epochs: int = 50, lr: float = 0.01, batch_size: int = 128,
                 seed: int = 0) -> dict[str, float]:
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    tr, te = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(tr.shape[1], num_private)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * 0.01)
        probe.bias.zero_()
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(tr), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(probe(tr[idx]), train_a[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_acc = float((probe(tr).argmax(1) == train_a).float().mean())
        test_acc = float((probe(te).argmax(1) == test_a).float().mean())
    return {"train_accuracy": train_acc, "unbiased_test_accuracy": test_acc, "chance": 1.0 / num_private}


def attribute_inference(train_feats: torch.Tensor, biased: SampleSet, test_feats: torch.Tensor,
                        unbiased: SampleSet, num_private: int, seed: int = 0) -> dict[str, Any]:
    """Probe frozen features of ``biased`` data (training) and of ``unbiased`` data (test)."""
    if num_private < 2:
        return {"train_accuracy": float("nan"), "unbiased_test_accuracy": float("nan"), "chance": 1.0,
                "skipped": "the dataset has no private attribute"}
    return linear_probe(train_feats, biased.private, test_feats, unbiased.private, num_private, seed=seed)
