"""The shard models by name (run-config key ``model``), one file each, registered like objectives.

* ``simple-conv`` (default): :class:`~fairforget.models.simple_conv.SimpleConvNet`, trained end to end;
* ``scatter-linear``: a fixed wavelet scattering front end and a linear head (Tramer and Boneh 2021);
* ``scatter-cnn``: the same front end and a small GroupNorm CNN on it (Tramer and Boneh 2021).

Every model has the interface the objectives, the head refit and the attribute probes use:
``features(x)`` (the bottleneck), a linear head ``fc`` on it, ``bottleneck_dim``. A model class also
says, as data, which objectives it cannot serve (``refuses``: objective name -> why), how to tell its
saved state from another model's (``matches(state)``: :func:`fairforget.model.load_model` reads a
state without being told the model) and its bottleneck size (``bottleneck(width)``).

A plugin model (``model = "package.module:Class"`` or an entry point of ``fairforget.models``) is a
``torch.nn.Module`` subclass with the same class attributes; a state it saved is loaded with
:func:`fairforget.model.build_model` and ``model=`` its name.
"""

from __future__ import annotations

import inspect

from torch import nn

from fairforget.models.scatter_cnn import ScatterCNN
from fairforget.models.scatter_linear import ScatterLinear
from fairforget.models.simple_conv import SimpleConvNet
from fairforget.plugins import Registry

MODELS: dict[str, type[nn.Module]] = {cls.name: cls for cls in (SimpleConvNet, ScatterLinear, ScatterCNN)}


def _is_model(obj: object) -> bool:
    return (isinstance(obj, type) and issubclass(obj, nn.Module) and not inspect.isabstract(obj)
            and isinstance(getattr(obj, "name", None), str) and callable(getattr(obj, "bottleneck", None)))


REGISTRY: Registry[type[nn.Module]] = Registry(
    "model", "model", MODELS, check=_is_model,
    expected="a fairforget model (a torch.nn.Module subclass with a name, features(x), an fc head and "
             "bottleneck(width))")

__all__ = ["MODELS", "REGISTRY", "ScatterCNN", "ScatterLinear", "SimpleConvNet"]
