"""Worked examples of fairforget plugins, in a package of their own (see ``docs/how-to/writing-a-strategy.md``):

* ``robust-fedavg`` (:mod:`.robust_fedavg`): FedAvg whose aggregation is Flower's ``FedTrimmedAvg`` or
  ``FedMedian``, robust to a Byzantine node;
* ``weighted-ensemble`` (:mod:`.weighted_ensemble`): a SISA shard ensemble whose shard models are weighted
  by their accuracy on a validation split (``biased-digits-val``, :mod:`.validation_data`).
"""
