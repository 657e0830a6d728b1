"""Typed run configuration with one source of defaults.

The defaults live once, in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (where Flower reads
them too). This module reads that table, applies a user's overrides (a TOML file, ``key=value``
pairs), checks every key, type and range, and returns a frozen :class:`RunConfig`. The ServerApp and
the ClientApp turn ``context.run_config`` into the same object once; deeper code never sees the
Flower ``Context``.

Names that select a registered part (``dataset``, ``strategy``, ``objective``, ``unlearn-method``,
``audit-attacks``: built-in or a plugin, :mod:`fairforget.plugins`) are checked by the registry that
owns them, where they are used; so are the plugins' own options (``strategy-options``,
``objective-options``, ``unlearner-options``, ``attack-options``, ``dataset-options``), whose shape,
a JSON object, is checked here: this module imports no registry.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

APP_DIR = Path(__file__).resolve().parents[1]
PYPROJECT = APP_DIR / "pyproject.toml"

PARTITIONS = ("iid", "site")
VOTES = ("softmax", "majority")
DEVICES = ("auto", "cpu", "cuda")
AUGMENT_GROUPS = ("class-private", "class")
ON_DELETE = ("regenerate", "drop")
CAPACITY_BOUNDS = ("newton", "dp")  # fairforget.capacity
CAPACITY_POLICIES = ("retrain", "refuse")
DP_CALIBRATIONS = ("none", "epsilon", "attack-risk")
DP_ACCOUNTANTS = ("prv", "rdp", "gdp")
DP_FEDAVG_CLIPPINGS = ("server", "client")  # strategies/fedavg_dp.py: where an update is clipped
SITE_AUDIT_SCOPES = ("shard", "ensemble")  # fairforget/audit/site.py: what a site audits


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message is one line for the user."""


T = TypeVar("T")


def _json_object(text: str, nested: bool = False) -> bool:
    """Whether ``text`` is empty or a JSON object (what ``strategy-options`` holds); ``nested``: one
    whose every value is an object too (``attack-options``: options by attack name)."""
    if not text.strip():
        return True
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and (not nested or all(isinstance(v, dict) for v in value.values()))


def lookup(key: str, name: str, registry: Mapping[str, T]) -> T:
    """``registry[name]``, or a one-line :class:`ConfigError` naming the run-config key and the choices."""
    if name not in registry:
        raise ConfigError(f"config key '{key}' = {name!r}: must be one of {', '.join(sorted(registry))}")
    return registry[name]


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, in snake case (``model-width`` -> ``model_width``)."""

    out_dir: str
    request: str
    seed: int
    dataset: str
    data_root: str
    image_size: int
    rho: float
    class_imbalance: float
    heldout_fraction: float
    test_fraction: float
    max_samples: int
    celeba_target: str
    celeba_private: str
    num_shards: int
    partition: str
    reply_timeout: float
    min_shards: int
    binding: str
    strategy: str
    strategy_options: str  # the strategy's own parameters, a JSON object (strategies.base: ``options``)
    objective_options: str  # a plugin objective's own parameters, a JSON object (fairforget.plugins)
    unlearner_options: str  # a plugin unlearner's, a JSON object
    attack_options: str  # plugin attacks', a JSON object by attack name
    dataset_options: str  # a plugin dataset's, a JSON object
    ensemble_vote: str
    rounds: int
    local_epochs: int
    slices: int
    epochs_per_slice: int
    batch_size: int
    lr: float
    weight_decay: float
    model_width: int
    objective: str
    end_alpha: float
    end_beta: float
    end_refit_epochs: int
    learned_mixin_entropy: float
    rebias_lambda: float
    rebias_lambda_g: float
    num_threads: int
    device: str
    dp: bool
    dp_noise_multiplier: float
    dp_calibrate: str
    dp_target_epsilon: float
    dp_target_tpr: float
    dp_target_fpr: float
    dp_max_grad_norm: float
    dp_delta: float
    dp_accountant: str
    dp_max_epsilon: float
    dp_secure_mode: bool
    dp_fedavg_clipping: str
    audit: bool
    audit_attacks: str
    audit_references: int
    audit_bootstrap: int
    site_audit_scope: str
    unlearn_method: str
    unlearn_epochs: int
    unlearn_lr: float
    newton_lambda: float
    capacity_bound: str
    capacity_eps: float
    capacity_delta: float
    capacity_c: float
    capacity_policy: str
    augment: bool
    augment_groups: str
    augment_kl_threshold: float
    augment_steps: int
    augment_retire_per_step: int
    augment_on_delete: str
    diffusion_width: int
    diffusion_train_steps: int
    diffusion_batch_size: int
    diffusion_lr: float
    diffusion_timesteps: int
    label_dropout: float
    ddim_steps: int
    ddim_eta: float
    guidance_scale: float
    classifier_guidance: float
    diffusion_group_reweight: float
    augment_filter: str
    augment_filter_max_draws: int
    client_cpus: int
    client_gpus: float

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a complete kebab-case mapping (Flower's ``context.run_config``)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(k for k in values if _snake(k) not in known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        missing = sorted(_kebab(n) for n in known if _kebab(n) not in values)
        if missing:
            raise ConfigError(f"missing config key(s): {', '.join(missing)}")
        kwargs = {name: _coerce(_kebab(name), values[_kebab(name)], f.type) for name, f in known.items()}
        config = cls(**kwargs)
        config.validate()
        return config

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case mapping Flower's run config uses."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    def to_toml(self) -> str:
        """The kebab-case mapping as a flat TOML table (``OUT/config.toml``, ``--run-config``)."""
        import tomli_w

        return tomli_w.dumps(self.to_mapping())

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (snake-case names), validated again."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first key whose value is out of range. The ServerApp,
        every ClientApp and the ``fairforget`` command all run it (``from_mapping``, ``replace``)."""
        for f in fields(self):  # inf passes every range check and nan fails them with a misleading message
            value = getattr(self, f.name)
            if str(f.type) == "float" and not (isinstance(value, int | float) and math.isfinite(value)):
                raise ConfigError(f"config key '{_kebab(f.name)}' = {value!r}: expected a finite number")
        checks: list[tuple[str, bool, str]] = [
            ("request", not self.request or (len(self.request) == 16 and self.request.isascii()
                                             and all(c in "0123456789abcdef" for c in self.request)),
             "empty (a training) or the 16-hex-digit id of a request in out-dir/requests/"),
            ("dataset", bool(self.dataset.strip()), "a dataset name"),
            ("strategy", bool(self.strategy.strip()), "a strategy name"),
            ("strategy-options", _json_object(self.strategy_options), "\"\" or a JSON object of options"),
            ("objective-options", _json_object(self.objective_options), "\"\" or a JSON object of options"),
            ("unlearner-options", _json_object(self.unlearner_options), "\"\" or a JSON object of options"),
            ("attack-options", _json_object(self.attack_options, nested=True),
             "\"\" or a JSON object of options by attack name ({\"my-attack\": {...}})"),
            ("dataset-options", _json_object(self.dataset_options), "\"\" or a JSON object of options"),
            ("objective", bool(self.objective.strip()), "an objective name"),
            ("end-alpha", self.end_alpha >= 0.0, ">= 0"),
            ("end-beta", self.end_beta >= 0.0, ">= 0"),
            ("end-refit-epochs", 0 <= self.end_refit_epochs <= 100_000, "in [0, 100000]"),
            ("learned-mixin-entropy", self.learned_mixin_entropy >= 0.0, ">= 0"),
            ("rebias-lambda", self.rebias_lambda >= 0.0, ">= 0"),
            ("rebias-lambda-g", self.rebias_lambda_g >= 0.0, ">= 0"),
            ("partition", self.partition in PARTITIONS, f"one of {', '.join(PARTITIONS)}"),
            ("ensemble-vote", self.ensemble_vote in VOTES, f"one of {', '.join(VOTES)}"),
            ("out-dir", bool(self.out_dir.strip()), "a non-empty path"),
            ("rho", 0.0 <= self.rho <= 1.0, "in [0, 1]"),
            ("class-imbalance", self.class_imbalance >= 1.0, ">= 1"),
            ("heldout-fraction", 0.0 < self.heldout_fraction < 0.5, "in (0, 0.5)"),
            ("test-fraction", 0.0 < self.test_fraction < 0.5, "in (0, 0.5)"),
            ("image-size", 8 <= self.image_size <= 64, "in [8, 64]"),
            ("max-samples", self.max_samples >= 0, ">= 0"),
            ("num-shards", 1 <= self.num_shards <= 64, "in [1, 64]"),
            ("reply-timeout", self.reply_timeout > 0, "> 0 seconds"),
            ("min-shards", 0 <= self.min_shards <= self.num_shards, "in [0, num-shards]"),
            ("rounds", self.rounds >= 1, ">= 1"),
            ("local-epochs", self.local_epochs >= 1, ">= 1"),
            ("slices", 1 <= self.slices <= 64, "in [1, 64]"),
            ("epochs-per-slice", self.epochs_per_slice >= 1, ">= 1"),
            ("batch-size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0.0, "> 0"),
            ("weight-decay", self.weight_decay >= 0.0, ">= 0"),
            ("model-width", 1 <= self.model_width <= 256, "in [1, 256]"),
            ("num-threads", self.num_threads >= 0, ">= 0 (0 = torch's default)"),
            ("device", self.device in DEVICES, f"one of {', '.join(DEVICES)}"),
            ("dp-noise-multiplier", self.dp_noise_multiplier >= 0.0, ">= 0"),
            ("dp-calibrate", self.dp_calibrate in DP_CALIBRATIONS, f"one of {', '.join(DP_CALIBRATIONS)}"),
            ("dp-target-epsilon", self.dp_target_epsilon > 0.0, "> 0"),
            ("dp-target-fpr", 0.0 < self.dp_target_fpr < 1.0, "in (0, 1)"),
            ("dp-target-tpr", self.dp_target_fpr < self.dp_target_tpr <= 1.0,
             f"in (dp-target-fpr, 1] (no attack can do worse than guessing, TPR = FPR = {self.dp_target_fpr})"),
            ("dp-max-grad-norm", self.dp_max_grad_norm > 0.0, "> 0"),
            ("dp-delta", 0.0 < self.dp_delta < 1.0, "in (0, 1)"),
            ("dp-accountant", self.dp_accountant in DP_ACCOUNTANTS, f"one of {', '.join(DP_ACCOUNTANTS)}"),
            ("dp-max-epsilon", self.dp_max_epsilon > 0.0, "> 0"),
            ("dp-fedavg-clipping", self.dp_fedavg_clipping in DP_FEDAVG_CLIPPINGS,
             f"one of {', '.join(DP_FEDAVG_CLIPPINGS)}"),
            ("audit-references", 0 <= self.audit_references <= 64, "in [0, 64]"),
            ("audit-bootstrap", 0 <= self.audit_bootstrap <= 10_000, "in [0, 10000]"),
            ("site-audit-scope", self.site_audit_scope in SITE_AUDIT_SCOPES, f"one of {', '.join(SITE_AUDIT_SCOPES)}"),
            ("unlearn-epochs", self.unlearn_epochs >= 1, ">= 1"),
            ("unlearn-lr", self.unlearn_lr > 0.0, "> 0"),
            ("newton-lambda", self.newton_lambda > 0.0, "> 0 (the head's loss must be strongly convex)"),
            ("capacity-bound", self.capacity_bound in CAPACITY_BOUNDS, f"one of {', '.join(CAPACITY_BOUNDS)}"),
            ("capacity-eps", self.capacity_eps > 0.0, "> 0"),
            ("capacity-delta", 0.0 < self.capacity_delta < 1.0, "in (0, 1)"),
            ("capacity-c", self.capacity_c > 0.0, "> 0"),
            ("capacity-policy", self.capacity_policy in CAPACITY_POLICIES, f"one of {', '.join(CAPACITY_POLICIES)}"),
            ("augment-groups", self.augment_groups in AUGMENT_GROUPS, f"one of {', '.join(AUGMENT_GROUPS)}"),
            ("augment-kl-threshold", self.augment_kl_threshold >= 0.0, ">= 0"),
            ("augment-steps", 0 <= self.augment_steps <= 100, "in [0, 100]"),
            ("augment-retire-per-step", self.augment_retire_per_step >= 0, ">= 0"),
            ("augment-on-delete", self.augment_on_delete in ON_DELETE, f"one of {', '.join(ON_DELETE)}"),
            ("diffusion-width", 4 <= self.diffusion_width <= 256 and self.diffusion_width % 4 == 0,
             "a multiple of 4 in [4, 256]"),
            ("diffusion-train-steps", self.diffusion_train_steps >= 1, ">= 1"),
            ("diffusion-batch-size", self.diffusion_batch_size >= 1, ">= 1"),
            ("diffusion-lr", self.diffusion_lr > 0.0, "> 0"),
            ("diffusion-timesteps", 10 <= self.diffusion_timesteps <= 4000, "in [10, 4000]"),
            ("label-dropout", 0.0 < self.label_dropout < 1.0, "in (0, 1) (the null label must be trained)"),
            ("ddim-steps", 1 <= self.ddim_steps <= self.diffusion_timesteps, "in [1, diffusion-timesteps]"),
            ("ddim-eta", 0.0 <= self.ddim_eta <= 1.0, "in [0, 1]"),
            ("guidance-scale", self.guidance_scale >= 0.0, ">= 0"),
            ("classifier-guidance", self.classifier_guidance >= 0.0, ">= 0"),
            ("diffusion-group-reweight", 0.0 <= self.diffusion_group_reweight <= 2.0, "in [0, 2]"),
            ("augment-filter", bool(self.augment_filter.strip()), "none or an objective name"),
            ("augment-filter-max-draws", 1 <= self.augment_filter_max_draws <= 100, "in [1, 100]"),
            ("client-cpus", self.client_cpus >= 1, ">= 1"),
            ("client-gpus", 0.0 <= self.client_gpus <= 8.0, "in [0, 8]"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' = {getattr(self, _snake(key))!r}: must be {expected}")
        if self.heldout_fraction + self.test_fraction >= 0.8:
            raise ConfigError("heldout-fraction + test-fraction must leave at least 20% for training")
        self._check_privacy()
        if self.dp and self.augment and self.diffusion_group_reweight > 0:
            raise ConfigError("config key 'diffusion-group-reweight' must be 0 with dp = true (reweighting changes "
                              "each sample's sampling rate, which the accountant does not model)")
        # what the chosen strategy supports (augment, dp) is its class's to say: strategies.check_config,
        # where the strategy is built (this module imports no registry of strategies)

    def _check_privacy(self) -> None:
        """What DP-SGD cannot honour, refused wherever the config is read (not only by the command's
        preflight): a batch-coupled objective's per-sample clipping bounds no sample's influence (EnD,
        ReBias), and ``dp-secure-mode`` needs torchcsprng, which does not install with torch 2.14."""
        if self.dp_secure_mode and importlib.util.find_spec("torchcsprng") is None:
            raise ConfigError("config key 'dp-secure-mode' = true needs torchcsprng (Opacus' cryptographic generator), "
                              "which is not installed and does not install with torch 2.14: turn it off; the DP-SGD "
                              "noise and Poisson masks are already seeded at each site from the operating system's "
                              "secure randomness, kept secret there (STATE/dp-seeds.json)")
        # DP-SGD with a batch-coupled objective (EnD, ReBias) is refused where DP-SGD is chosen: by the
        # strategy that declares it (strategies.check_config) and by the site's SISA training (fairforget.sisa)

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    @property
    def required_shards(self) -> int:
        """Shards that must reply for a round to count (``min-shards``; 0 = all of them)."""
        return self.min_shards or self.num_shards

    @property
    def server_has_data(self) -> bool:
        """Whether the ServerApp can load the data itself: embedded data (``biased-digits``, or a dataset
        plugin that declares ``EMBEDDED``), or a real loader with a ``data-root`` on the server. Without
        it (sites with their own data), evaluation and audits run at the sites and the server keeps no
        patient data."""
        if self.data_root.strip() or self.dataset == "biased-digits":
            return True
        from fairforget.data import dataset_declares  # noqa: PLC0415 - resolves a dataset plugin (and torch)

        return dataset_declares(self.dataset, "EMBEDDED")  # a plugin's own embedded data

    def torch_device(self) -> str:
        """``auto`` resolves to ``cuda`` when a GPU is visible, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------- defaults and overrides
def load_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the app's ``pyproject.toml``."""
    with pyproject.open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def read_toml(path: Path) -> dict[str, Any]:
    """A user's config file: a flat table of run-config keys (a ``[tool.flwr.app.config]`` or
    ``[config]`` table is accepted too)."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for table in (("tool", "flwr", "app", "config"), ("config",)):
        node: Any = data
        for part in table:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return dict(node)
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config file {path}: unexpected table(s) {', '.join(nested)}")
    return data


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings from the command line; values are parsed as TOML scalars where they
    can be (``3``, ``0.5``, ``true``, ``"x"``) and taken as plain strings otherwise."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key.strip()] = value
    return out


def resolve(*overrides: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then each override mapping in order; unknown keys are rejected."""
    merged = dict(load_defaults() if defaults is None else defaults)
    for layer in overrides:
        unknown = sorted(k for k in layer if k not in merged)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        merged.update(layer)
    return RunConfig.from_mapping(merged)


def parse_ids(text: str) -> list[int]:
    """``"3,17,42"`` -> ``[3, 17, 42]``; a clear error for anything else."""
    ids: list[int] = []
    for token in text.replace("\n", ",").split(","):
        token = token.strip()
        if not token:
            continue
        if not (token.isascii() and token.isdigit()):  # str.isdigit takes '²' (int() fails) and '١' (int() = 1)
            raise ConfigError(f"sample ids must be non-negative integers (digits 0-9), got {token!r}")
        ids.append(int(token))
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"sample id(s) listed twice: {', '.join(map(str, dup))}")
    return ids


# ---------------------------------------------------------------------- helpers
def _snake(key: str) -> str:
    return key.replace("-", "_")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}[str(annotation)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):  # TOML's inf and nan
        raise ConfigError(f"config key '{key}' = {value!r}: expected a finite number")
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{key}' = {value!r}: expected {kind.__name__}, got {type(value).__name__}"
        )
    return value
