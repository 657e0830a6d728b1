"""Biased-Digits with a validation split of its own: a dataset plugin (``fairforget.datasets`` entry point
``biased-digits-val``, or ``dataset = "fairforget_examples.validation_data:load"``).

:func:`load` is the embedded default data (:func:`fairforget.data.biased_digits.load`, unchanged) less
a validation split that :func:`validation` returns: the test digits whose record id (the row of
``sklearn.datasets.load_digits``) draws below :data:`FRACTION`, by
:func:`fairforget.data.base.split_unit` (a hash of the seed and the id, so the split is deterministic in
the seed and no other row moves it). Those digits leave both test sets; the rest of the test set is
reported as the test set. The validation split is neither the audit's non-members (``heldout``) nor the
test set, and no shard model trains on it.

Why out of the test set, not out of the training set: the validation split is there to weight shard
models by *unbiased* accuracy (:mod:`fairforget_examples.weighted_ensemble`). The training pool is
rendered with the colour shortcut (``rho``, 0.99 by default), so a split carved from it would reward
the shard models that learned the shortcut best, the opposite of what the weights are for, and it would
shrink the shards, so the shard models would no longer be the default data's. The test digits exist in
an unbiased rendering (every digit in each of the 10 colours, colour independent of the label), which
is what the validation split holds. Carving from the test set leaves ``train`` and ``heldout`` (hence
the shards, the models and the audit's non-members) exactly those of ``biased-digits``; the cost is a
smaller test set, and a figure on ``biased-digits-val`` is comparable only with another on it.

:func:`load_sites` is the workload of the weighted-ensemble study (``weighted_study.py``): the same
data, its training set held by :data:`SITES` sites (``partition = "site"``, ``num-shards = 4``), of
which the last recorded its images without the colour shortcut (its records recoloured at rho = 0.1,
colour independent of the label). Shards of unequal quality, by the data each site holds, with no
change to fairforget and nothing degraded at the server.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from fairforget.data import biased_digits
from fairforget.data.base import (
    BIASED_MNIST_COLOURS,
    UNBIASED_RHO,
    DataBundle,
    SampleSet,
    assign_colours,
    colourise,
    split_unit,
)

#: the data ships with the package (fairforget's embedded digits): no data-root, so in a simulation the
#: ServerApp holds it too (its evaluation, audit and this example's validation weights run there)
EMBEDDED = True
#: the share of the test digits (by record id) carved off as the validation split
FRACTION = 0.3
#: the sites of :func:`load_sites`; the last one holds records without the colour shortcut
SITES = 4
#: the run-config keys :func:`fairforget.data.biased_digits.load` reads (what the split depends on)
DATA_KEYS = ("image_size", "rho", "class_imbalance", "heldout_fraction", "test_fraction", "seed")
_COLOURS = len(BIASED_MNIST_COLOURS)  # an unbiased test row's id is 10 * record id + colour


def load(data_cfg: Any) -> DataBundle:
    """Biased-Digits less the validation split (:func:`validation`): ``train`` and ``heldout`` are the
    default data's, both test sets lose the validation digits."""
    return _split(_keys(data_cfg))[0]


def validation(data_cfg: Any) -> SampleSet:
    """The validation split: each carved test digit in every colour (ids ``10 * record id + colour``,
    as the unbiased test set's); ``data_cfg`` is the run config or the loader's data config."""
    return _split(_keys(data_cfg))[1]


def record_ids(samples: SampleSet, unbiased: bool) -> np.ndarray:
    """The record id (the ``load_digits`` row) of each sample; ``unbiased``: rows of the unbiased test
    rendering, whose ids carry the colour too."""
    ids = samples.ids.numpy()
    return ids // _COLOURS if unbiased else ids


def load_sites(data_cfg: Any) -> DataBundle:
    """:func:`load`, its training set held by :data:`SITES` sites (each record in the site its id
    draws), the last site's records recoloured at rho = 0.1 (colour independent of the label): the
    workload where shards differ in quality. Run with ``partition = "site"`` and ``num-shards = 4``."""
    bundle = load(data_cfg)
    train, seed = bundle.train, int(data_cfg.seed)
    site = np.array([int(split_unit(seed, "example-site", str(i)) * SITES) for i in train.ids.tolist()])
    last = np.flatnonzero(site == SITES - 1)
    x, private = train.x.clone(), train.private.clone()
    colours = assign_colours(train.y[last].numpy(), UNBIASED_RHO, np.random.default_rng(seed + 104_729))
    x[last] = colourise(_strokes(train.x[last], train.private[last].numpy()), colours)
    private[last] = torch.as_tensor(colours)
    train = SampleSet(x, train.y.clone(), private, train.ids.clone(), torch.as_tensor(site, dtype=torch.long))
    return dataclasses.replace(bundle, name="biased-digits-val-sites", train=train)


def _strokes(x: torch.Tensor, colours: np.ndarray) -> torch.Tensor:
    """The grey strokes ``g`` of images ``x = g + (1 - g) * colour`` (:func:`colourise` inverted), read off
    each image's darkest background channel (every colour has one below 1)."""
    bg = torch.as_tensor(BIASED_MNIST_COLOURS[colours])  # (N, 3)
    channel = bg.argmin(1)
    picked = x[torch.arange(len(x)), channel]  # (N, H, W)
    low = bg.gather(1, channel[:, None]).view(-1, 1, 1)
    return ((picked - low) / (1.0 - low)).clamp(0.0, 1.0).unsqueeze(1)


def _keys(data_cfg: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((k, getattr(data_cfg, k)) for k in DATA_KEYS)


@functools.lru_cache(maxsize=4)
def _split(data_keys: tuple[tuple[str, Any], ...]) -> tuple[DataBundle, SampleSet]:
    """(the bundle less the validation split, the validation split), cached on the data keys."""
    cfg = SimpleNamespace(**dict(data_keys))
    bundle = biased_digits.load(cfg)

    def carved(samples: SampleSet, unbiased: bool) -> np.ndarray:
        return np.array([split_unit(int(cfg.seed), "example-validation", str(r)) < FRACTION
                         for r in record_ids(samples, unbiased).tolist()], dtype=bool)

    val_unbiased, val_biased = carved(bundle.test_unbiased, True), carved(bundle.test_biased, False)
    held = bundle.test_unbiased.subset(np.flatnonzero(val_unbiased))
    rest = dataclasses.replace(bundle, name="biased-digits-val",
                               test_biased=bundle.test_biased.subset(np.flatnonzero(~val_biased)),
                               test_unbiased=bundle.test_unbiased.subset(np.flatnonzero(~val_unbiased)))
    return rest, held
