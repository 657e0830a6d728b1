"""fairforget: federated privacy-preserving debiasing on Flower.

The shared core of the Flower App: typed run configuration, data, the SimpleConvNet model, metrics,
the deletion ledger and the report. The Flower components live beside it in ``server/``,
``clients/`` and ``strategies/``.
"""

__version__ = "0.1.0"
