"""Biased-Digits: the embedded default dataset.

scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download) rendered the
Biased-MNIST way (Bahng et al. 2020): white strokes on one of 10 background colours, with
colour-class correlation ``rho`` in the training data and an unbiased test set. Sample ids are the
row numbers of ``sklearn.datasets.load_digits``.
"""

from __future__ import annotations

import numpy as np
import torch

from fairforget.data.base import DataBundle, biased_mnist_bundle, resize, stratified_split

EMBEDDED = True  # ships with the package (scikit-learn's digits): no data-root, the ServerApp holds it


def load(cfg) -> DataBundle:  # cfg: fairforget.config.RunConfig
    from sklearn.datasets import load_digits  # imported when the data is built, not with the package

    digits = load_digits()
    gray = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    gray = resize(gray, cfg.image_size)
    labels = digits.target.astype(np.int64)
    ids = np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(cfg.seed + 7919)
    test_pos, pool_pos = stratified_split(labels, (cfg.test_fraction,), rng)
    heldout_of_pool = cfg.heldout_fraction / (1.0 - cfg.test_fraction)
    return biased_mnist_bundle(
        "biased-digits",
        gray[pool_pos], labels[pool_pos], ids[pool_pos],
        gray[test_pos], labels[test_pos], ids[test_pos],
        rho=cfg.rho,
        class_imbalance=cfg.class_imbalance,
        heldout_fraction=heldout_of_pool,
        seed=cfg.seed,
    )
