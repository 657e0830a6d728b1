"""Typed run configuration, each key declared once.

:class:`RunConfig` declares every run-config key as a field (:func:`key`): its type (the annotation),
default, one-line meaning and the values it may take (a range, choices, or for a free-form string its
:class:`Form`); :data:`KEYS` lists them as :class:`Key` objects. :meth:`RunConfig.validate` enforces
each, with a one-line :class:`ConfigError` naming the key, its value and the rule. Flower reads the
defaults from ``pyproject.toml`` (``[tool.flwr.app.config]``), which repeats them and is checked
against the declaration (``tests/test_config_schema.py``); the reference page and the JSON Schema are
generated from it (``docs/gen_reference.py``, :mod:`fairforget.config_schema`). A new key is one field
here and one line in ``pyproject.toml``.

This module reads that table, applies a user's overrides (a TOML file, ``key=value`` pairs), checks
every key, type and range, and returns a frozen :class:`RunConfig`. The ServerApp and the ClientApp
turn ``context.run_config`` into the same object once; deeper code never sees the Flower ``Context``.

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
from collections.abc import Callable, Mapping
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
RETIRE_ORDERS = ("random", "least-informative")  # fairforget/lsi.py RETIRE_ORDERS
CAPACITY_BOUNDS = ("newton", "dp")  # fairforget.capacity
CAPACITY_POLICIES = ("retrain", "refuse")
DP_CALIBRATIONS = ("none", "epsilon", "attack-risk", "plan")
DP_ACCOUNTANTS = ("prv", "rdp", "gdp")
DP_FEDAVG_CLIPPINGS = ("server", "client")  # strategies/fedavg_dp.py: where an update is clipped
SITE_AUDIT_SCOPES = ("shard", "ensemble")  # fairforget/audit/site.py: what a site audits
ERASERS = ("none", "leace", "leace-per-stage")  # fairforget/erasure.py: the private attribute's eraser


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message is one line for the user."""


T = TypeVar("T")


def _snake(key: str) -> str:
    return key.replace("-", "_")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


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


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds a function
class Form:
    """What a free-form string key holds (a path, a name a registry resolves, JSON options): how the
    reference describes it, what :meth:`RunConfig.validate` checks (``None``: anything goes) and its JSON
    Schema."""

    description: str
    check: Callable[[str], bool] | None = None
    json_schema: Mapping[str, Any] = dataclasses.field(default_factory=dict)


PATH = Form("a path (may be empty)")
OUT_PATH = Form("a non-empty path", lambda v: bool(v.strip()), {"minLength": 1, "pattern": r"\S"})
NAME = Form("a registered name (built-in or plugin)", lambda v: bool(v.strip()), {"minLength": 1, "pattern": r"\S"})
NAMES = Form("comma-separated registered names")
TEXT = Form("free text")
JSON_OPTIONS = Form("\"\" or a JSON object of options", _json_object)
JSON_OPTIONS_BY_NAME = Form("\"\" or a JSON object of options by attack name ({\"my-attack\": {...}})",
                            lambda v: _json_object(v, nested=True))
REQUEST_ID = Form("empty (a training) or the 16-hex-digit id of a request in out-dir/requests/",
                  lambda v: not v or (len(v) == 16 and v.isascii() and all(c in "0123456789abcdef" for c in v)),
                  {"pattern": "^([0-9a-f]{16})?$"})
FORMS = {"path": PATH, "out-path": OUT_PATH, "name": NAME, "names": NAMES, "text": TEXT,
         "json-options": JSON_OPTIONS, "json-options-by-name": JSON_OPTIONS_BY_NAME, "request-id": REQUEST_ID}

Bound = float | str  # a number, or the name of the key whose value bounds this one (``min-shards`` <= ``num-shards``)


@dataclass(frozen=True)
class Key:
    """One run-config key, declared once as a :class:`RunConfig` field (:func:`key`): its type (the
    field's annotation), default, one-line meaning and the values it may take: a range (``minimum``,
    ``maximum``, exclusive where ``open_min``/``open_max``; a bound may name another key), ``choices``,
    or, for a free-form string, its :class:`Form`. ``pyproject.toml`` repeats the default for Flower
    (checked by ``tests/test_config_schema.py``); the reference page and the JSON Schema are generated
    from these (:mod:`fairforget.config_schema`)."""

    default: Any
    meaning: str
    minimum: Bound | None = None
    maximum: Bound | None = None
    open_min: bool = False
    open_max: bool = False
    multiple_of: int | None = None
    choices: tuple[str, ...] = ()
    form: Form | None = None
    rule_text: str = ""  # a free-form key's rule in its own words ("a dataset name")
    note: str = ""  # said after the rule in an error ("(0 = torch's default)")
    name: str = ""  # kebab case; these three are filled in from the field (KEYS)
    type: type = object
    section: str = ""

    def rule(self) -> str:
        """What the value must be, as an error and the reference say it: ``in [1, 64]``, ``one of a, b``."""
        if self.choices:
            text = f"one of {', '.join(self.choices)}"
        elif self.form is not None:
            text = self.rule_text or self.form.description
        elif self.type is bool:
            text = "true or false"
        else:
            lo, hi = (_number(b) for b in (self.minimum, self.maximum))
            if self.minimum is not None and self.maximum is not None:
                text = f"in {'(' if self.open_min else '['}{lo}, {hi}{')' if self.open_max else ']'}"
            elif self.minimum is not None:
                text = f"{'>' if self.open_min else '>='} {lo}"
            elif self.maximum is not None:
                text = f"{'<' if self.open_max else '<='} {hi}"
            else:
                text = f"any {self.type.__name__}"
            if self.multiple_of:
                text = f"a multiple of {self.multiple_of} {text}"
        return f"{text} {self.note}" if self.note else text

    def holds(self, value: Any, config: Any) -> bool:
        """Whether ``value`` obeys the rule; ``config`` gives the keys a bound names."""
        if self.choices:
            return value in self.choices
        if self.form is not None:
            return self.form.check is None or self.form.check(value)
        if self.type not in (int, float):
            return True
        lo, hi = (getattr(config, _snake(b)) if isinstance(b, str) else b for b in (self.minimum, self.maximum))
        return ((lo is None or (value > lo if self.open_min else value >= lo))
                and (hi is None or (value < hi if self.open_max else value <= hi))
                and (not self.multiple_of or value % self.multiple_of == 0))

    @property
    def relative(self) -> bool:
        """A bound names another key: checked after every key's own range."""
        return isinstance(self.minimum, str) or isinstance(self.maximum, str)


def key(default: Any, meaning: str, **rules: Any) -> Any:
    """A :class:`RunConfig` field declaring a run-config key (:class:`Key`: ``minimum``, ``maximum``,
    ``open_min``, ``open_max``, ``multiple_of``, ``choices``, ``form``, ``rule_text``, ``note``)."""
    return dataclasses.field(default=default, metadata={"key": Key(default, meaning, **rules)})


# The reference page's sections, each from its first key on (in RunConfig's order, pyproject.toml's too).
SECTIONS = (
    ("out-dir", "What the run does"),
    ("dataset", "Data"),
    ("num-shards", "Federation"),
    ("slices", "SISA training"),
    ("dp", "Differential privacy: DP-SGD with Opacus (fairforget/privacy/)"),
    ("audit", "Privacy audit"),
    ("unlearn-method", "Unlearning and the deletion-capacity budget (fairforget/capacity.py)"),
    ("augment", "Bias-aware diffusion augmentation (clients/augment.py, server/augment.py)"),
    ("client-cpus", "Simulation engine"),
)
BETWEEN_0_1 = {"minimum": 0.0, "maximum": 1.0, "open_min": True, "open_max": True}  # (0, 1)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every run-config key, in snake case (``model-width`` -> ``model_width``), each declared once
    here: type, default, meaning and the values it may take (:func:`key`, :class:`Key`)."""

    # --- what the run does
    out_dir: str = key("runs/demo", "where metrics.json, ledger.jsonl, report.md and the models go", form=OUT_PATH)
    request: str = key("", "\"\" = train; else the id of a deletion request in out-dir/requests/ (written by "
                       "`fairforget forget` or `fairforget request`; it never rides in the run config)",
                       form=REQUEST_ID)
    seed: int = key(0, "seed of the data split, the partition and every training", minimum=0, maximum=2**32 - 1)
    # --- data
    dataset: str = key("biased-digits", "the dataset: biased-digits, biased-mnist, cifar10-skewed, celeba, "
                       "image-folder, or a dataset plugin's name", form=NAME, rule_text="a dataset name")
    data_root: str = key("", "on-disk root of the real loaders' data", form=PATH)
    image_size: int = key(16, "side of the square images the loaders produce, in pixels", minimum=8, maximum=64)
    rho: float = key(0.99, "colour-class correlation of the training data (Biased-MNIST)", minimum=0.0, maximum=1.0)
    class_imbalance: float = key(1.0, "largest / smallest class size in train and held-out (1 = none)", minimum=1.0)
    heldout_fraction: float = key(0.2, "share of the data kept out of training as non-members for the audits",
                                  minimum=0.0, maximum=0.5, open_min=True, open_max=True)
    test_fraction: float = key(0.2, "share of the data kept for the biased and unbiased test sets",
                               minimum=0.0, maximum=0.5, open_min=True, open_max=True)
    max_samples: int = key(0, "cap on the training set of the real loaders (0 = no cap)", minimum=0)
    celeba_target: str = key("Blond_Hair", "CelebA attribute to classify (a column of list_attr_celeba.txt)",
                             form=TEXT)
    celeba_private: str = key("Male", "CelebA attribute taken as the private, biasing one", form=TEXT)
    # --- federation
    num_shards: int = key(4, "S: shards, one Flower client (SuperNode) each (at most the training samples)",
                           minimum=1, maximum=1024)
    partition: str = key("iid", "how records are dealt to shards: iid at random, site by their site",
                         choices=PARTITIONS)
    reply_timeout: float = key(1800.0, "seconds without any reply before the unanswered nodes count as lost",
                               minimum=0.0, open_min=True, note="seconds")
    min_shards: int = key(0, "shards that must reply for a round to count (0 = all; fewer: a one-line error)",
                          minimum=0, maximum="num-shards")
    binding: str = key("", "deployment: the operator's binding file (TOML: [[site]] name, shard, node-id), on the "
                       "ServerApp's machine; required when the sites keep their own data (\"\" = the server assigns "
                       "shards to the node ids it sees)", form=PATH)
    strategy: str = key("shard-ensemble", "the strategy: shard-ensemble, fedavg, a plugin's name or "
                        "\"package.module:Class\"", form=NAME, rule_text="a strategy name")
    strategy_options: str = key("", "the chosen strategy's own parameters, a JSON object, e.g. "
                                "'{\"trim-fraction\": 0.1}' (its class declares them)", form=JSON_OPTIONS)
    objective_options: str = key("", "a plugin objective's own parameters, a JSON object (its class declares them)",
                                 form=JSON_OPTIONS)
    unlearner_options: str = key("", "the unlearn-method's own parameters (rem's, a plugin's), a JSON object (its "
                                 "module declares them)", form=JSON_OPTIONS)
    attack_options: str = key("", "plugin attacks' own parameters, a JSON object by attack name: "
                              "'{\"my-attack\": {\"k\": 3}}'", form=JSON_OPTIONS_BY_NAME)
    dataset_options: str = key("", "a plugin dataset's own parameters, a JSON object (its loader declares them)",
                               form=JSON_OPTIONS)
    ensemble_vote: str = key("softmax", "how the shard models vote: softmax (mean of probabilities) or majority",
                             choices=VOTES)
    rounds: int = key(3, "FedAvg rounds (shard-ensemble runs one round per slice)", minimum=1)
    local_epochs: int = key(2, "FedAvg local epochs per round", minimum=1)
    # --- SISA training
    slices: int = key(4, "R: slices per shard, a checkpoint after each", minimum=1, maximum=64)
    epochs_per_slice: int = key(3, "training epochs after each slice is added", minimum=1)
    batch_size: int = key(32, "training batch size", minimum=1)
    lr: float = key(0.002, "learning rate of the shard models (Adam)", minimum=0.0, open_min=True)
    weight_decay: float = key(0.0, "L2 weight decay of the shard models", minimum=0.0)
    model_width: int = key(8, "SimpleConvNet base width (16 = the paper's 16-32-64-128)", minimum=1, maximum=256)
    model: str = key("simple-conv", "the shard model: simple-conv, scatter-linear or scatter-cnn (a fixed scattering "
                     "front end, Tramer and Boneh 2021; fairforget/models/) or a plugin's name", form=NAME,
                     rule_text="a model name")
    objective: str = key("cross-entropy", "the training objective: cross-entropy, end, learned-mixin, rubi, rebias "
                         "(fairforget/objectives/) or a plugin's name", form=NAME, rule_text="an objective name")
    end_alpha: float = key(50.0, "EnD: weight of the disentangling term (same bias -> orthogonal features)",
                           minimum=0.0)
    end_beta: float = key(10.0, "EnD: weight of the entangling term (same class, other bias -> aligned)", minimum=0.0)
    end_refit_epochs: int = key(200, "EnD: full-batch epochs refitting the linear head on the frozen bottleneck "
                                "after each training (0 = off)", minimum=0, maximum=100_000)
    learned_mixin_entropy: float = key(0.1, "Learned-Mixin + H: weight of the entropy penalty on the bias expert",
                                       minimum=0.0)
    rebias_lambda: float = key(1.0, "ReBias: weight of HSIC(f, g) in the main model's loss", minimum=0.0)
    rebias_lambda_g: float = key(1.0, "ReBias: weight of -HSIC(f, g) in the bias network's loss", minimum=0.0)
    eraser: str = key("none", "erase the private attribute from the bottleneck with LEACE: none, leace (post-hoc, "
                      "fitted at each site after each stage) or leace-per-stage (also refit before each stage "
                      "trains); refused with dp", choices=ERASERS)
    num_threads: int = key(1, "torch threads per client (fixed so training is deterministic)", minimum=0,
                           note="(0 = torch's default)")
    device: str = key("auto", "where torch runs: auto (cuda when there is one), cpu or cuda", choices=DEVICES)
    # --- differential privacy
    dp: bool = key(False, "shard-ensemble: DP-SGD in every shard training; fedavg: user-level DP (Flower)")
    dp_noise_multiplier: float = key(1.0, "sigma of DP-SGD (used as is when dp-calibrate = none)", minimum=0.0)
    dp_calibrate: str = key("none", "how sigma is chosen: none, epsilon (for dp-target-epsilon), attack-risk "
                            "(for dp-target-tpr) or plan (sigma and every stage's steps, batch, lr and clipping norm "
                            "for dp-target-epsilon: fairforget/privacy/planner.py)", choices=DP_CALIBRATIONS)
    dp_plan: str = key("", "the SISA stages' DP schedule the planner chose (JSON; written by dp-calibrate = plan, "
                       "\"\" = the non-private schedule)", form=JSON_OPTIONS)
    dp_plan_retrains: int = key(2, "full SISA retrains the planner leaves room for within dp-max-epsilon",
                                minimum=0, maximum=1000)
    dp_target_epsilon: float = key(4.0, "epsilon a shard's planned SISA training may reach (dp-calibrate = epsilon)",
                                   minimum=0.0, open_min=True)
    dp_target_tpr: float = key(0.05, "the most any membership attack may reach at dp-target-fpr (mu-GDP bound)",
                               minimum="dp-target-fpr", maximum=1.0, open_min=True,
                               note="(no attack can do worse than guessing: TPR = FPR)")
    dp_target_fpr: float = key(0.01, "the false-positive rate dp-target-tpr is set at", **BETWEEN_0_1)
    dp_max_grad_norm: float = key(1.0, "clipping norm: per sample (DP-SGD) or of a client's whole update (fedavg)",
                                  minimum=0.0, open_min=True)
    dp_delta: float = key(1e-5, "delta of the (epsilon, delta) guarantee", **BETWEEN_0_1)
    dp_accountant: str = key("prv", "the Opacus accountant: prv, rdp or gdp", choices=DP_ACCOUNTANTS)
    dp_max_epsilon: float = key(50.0, "hard stop: a training that would take a shard past this epsilon is refused "
                                "(the dp-* keys are fixed in a site's state at its first DP training)",
                                minimum=0.0, open_min=True)
    dp_secure_mode: bool = key(False, "true is refused: needs torchcsprng, which does not install with torch 2.14 "
                               "(the noise is seeded at each site from the OS's secure randomness anyway)")
    dp_fedavg_clipping: str = key("server", "fedavg + dp (Flower's fixed-clipping wrapper): who clips an update, "
                                  "the server or each client", choices=DP_FEDAVG_CLIPPINGS)
    # --- privacy audit
    audit: bool = key(True, "audit after simulate and every forget")
    audit_attacks: str = key("loss,confidence,entropy,lira-offline,rmia", "membership attacks of the audit, "
                             "comma-separated (also lira-online, which trains shadows, or a plugin's name)", form=NAMES)
    audit_references: int = key(2, "offline reference models (LiRA offline needs >= 2, online >= 4)",
                                minimum=0, maximum=64)
    audit_bootstrap: int = key(200, "bootstrap resamples for the TPR-at-low-FPR intervals", minimum=0, maximum=10_000)
    site_audit_scope: str = key("shard", "what a site audits: shard (its own shard model) or ensemble (every site "
                                "gets every shard's weights; one site can attack the others)",
                                choices=SITE_AUDIT_SCOPES)
    # --- unlearning and the deletion-capacity budget
    unlearn_method: str = key("exact-sisa", "the unlearning method: exact-sisa, finetune, neggrad, scrub, newton, "
                              "del, rem (fairforget/unlearning/) or a plugin's name", form=NAME,
                              rule_text="an unlearning method's name")
    unlearn_epochs: int = key(2, "epochs of the approximate methods that train (finetune, neggrad, scrub, del, rem)",
                              minimum=1)
    unlearn_lr: float = key(0.0005, "their learning rate (Adam; a quarter of the SISA lr)", minimum=0.0, open_min=True)
    newton_lambda: float = key(0.5, "L2 strength making the head's loss strongly convex (newton; noise ~ 1/lambda^2)",
                               minimum=0.0, open_min=True, note="(the head's loss must be strongly convex)")
    capacity_bound: str = key("newton", "the Sekhari et al. 2021 bound giving each shard's deletion capacity",
                              choices=CAPACITY_BOUNDS)
    capacity_eps: float = key(1.0, "epsilon of the unlearning guarantee the capacity is computed for", minimum=0.0,
                              open_min=True)
    capacity_delta: float = key(1e-5, "delta of the unlearning guarantee the capacity is computed for", **BETWEEN_0_1)
    capacity_c: float = key(1.0, "the bound's constant (c ~ 1: order of magnitude)", minimum=0.0, open_min=True)
    capacity_policy: str = key("retrain", "when a shard's budget is spent: retrain (exact SISA retrain) or refuse "
                               "(an error, nothing changed)", choices=CAPACITY_POLICIES)
    # --- bias-aware diffusion augmentation
    augment: bool = key(False, "after training: augment every shard, then retire originals step by step")
    augment_groups: str = key("class-private", "the groups balanced: class-private ((class, private) groups) or "
                              "class (classes only)", choices=AUGMENT_GROUPS)
    augment_kl_threshold: float = key(0.01, "generate until KL(p_group || uniform) <= this, per shard", minimum=0.0)
    augment_steps: int = key(2, "retire-and-replenish steps after the first augmentation", minimum=0, maximum=100)
    augment_retire_per_step: int = key(32, "originals each shard unlearns per step (its deletion budget per step)",
                                       minimum=0)
    augment_retire_order: str = key("random", "which live originals a step retires: random (seeded) or "
                                    "least-informative (lowest Laplace Sample Information first)",
                                    choices=RETIRE_ORDERS)
    augment_on_delete: str = key("regenerate", "what happens to a deleted original's generator and samples",
                                 choices=ON_DELETE)
    diffusion_width: int = key(16, "UNet2DModel block_out_channels = (w, 2w)", minimum=4, maximum=256,
                               multiple_of=4)
    diffusion_train_steps: int = key(1500, "DDPM training steps per shard", minimum=1)
    diffusion_batch_size: int = key(64, "batch size of the generator's training", minimum=1)
    diffusion_lr: float = key(0.002, "learning rate of the generator's training", minimum=0.0, open_min=True)
    diffusion_timesteps: int = key(1000, "DDPMScheduler training timesteps", minimum=10, maximum=4000)
    label_dropout: float = key(0.2, "per-factor null-label rate in training (classifier-free guidance)",
                               **BETWEEN_0_1, note="(the null label must be trained)")
    ddim_steps: int = key(20, "DDIMScheduler sampling steps", minimum=1, maximum="diffusion-timesteps")
    ddim_eta: float = key(1.0, "DDIM stochasticity: 0 deterministic, 1 DDPM-like (keeps colours saturated)",
                          minimum=0.0, maximum=1.0)
    guidance_scale: float = key(1.5, "classifier-free guidance w per factor (0 = unconditional, 1 = conditional)",
                                minimum=0.0)
    classifier_guidance: float = key(0.0, "classifier guidance scale s (0 = off)", minimum=0.0)
    diffusion_group_reweight: float = key(0.0, "generator batches weight a sample by n_group^-this (1: rare groups "
                                          "as often as common)", minimum=0.0, maximum=2.0)
    augment_filter: str = key("none", "none, or an objective name (e.g. end): keep the generated samples a site "
                              "classifier trained with it labels as the requested class", form=NAME,
                              rule_text="none or an objective name")
    augment_filter_max_draws: int = key(8, "the filter draws at most this many candidates per requested sample",
                                        minimum=1, maximum=100)
    # --- simulation engine
    client_cpus: int = key(1, "Ray CPUs per simulated client", minimum=1)
    client_gpus: float = key(0.0, "Ray GPUs per simulated client (e.g. 0.25 to share one GPU by 4)", minimum=0.0,
                             maximum=8.0)

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
        kwargs = {_snake(k.name): _coerce(k.name, values[k.name], k.type) for k in KEYS}
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
        """Raise :class:`ConfigError` naming the first key whose value breaks its declared rule
        (:class:`Key`), then the rules that join keys. The ServerApp, every ClientApp and the
        ``fairforget`` command all run it (``from_mapping``, ``replace``)."""
        for k in KEYS:  # inf passes every range check and nan fails them with a misleading message
            value = getattr(self, _snake(k.name))
            if k.type is float and not (isinstance(value, int | float) and math.isfinite(value)):
                raise ConfigError(f"config key '{k.name}' = {value!r}: expected a finite number")
        for k in sorted(KEYS, key=lambda k: k.relative):  # a bound naming a key once that key is checked
            value = getattr(self, _snake(k.name))
            if not k.holds(value, self):
                raise ConfigError(f"config key '{k.name}' = {value!r}: must be {k.rule()}")
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
        if self.dp and self.eraser != "none":
            raise ConfigError(f"config key 'eraser' = {self.eraser!r} with dp = true: a LEACE fit on the site's data "
                              "(its mean and covariances) spends privacy that is not accounted: refused")
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

    def check_simulation_resources(self, cores: int | None = None, gpus: int | None = None) -> None:
        """A :class:`ConfigError` when Flower's simulation engine could never start a client on this
        machine: ``client-cpus`` above its CPU cores, ``client-gpus`` above 0 without a GPU or above its
        GPU count (Ray would wait for resources that never come). Run before Flower starts; ``cores`` and
        ``gpus`` default to this machine's (``os.cpu_count()``, ``torch.cuda.device_count()``)."""
        import os

        cores = (os.cpu_count() or 1) if cores is None else cores
        if self.client_cpus > cores:
            raise ConfigError(f"config key 'client-cpus' = {self.client_cpus}: this machine has {cores} CPU core(s), "
                              f"so no simulated client could start; use at most {cores}")
        if self.client_gpus > 0:
            if gpus is None:
                import torch

                gpus = torch.cuda.device_count()
            if self.client_gpus > gpus:
                raise ConfigError(f"config key 'client-gpus' = {self.client_gpus:g}: this machine has {gpus} GPU(s), "
                                  "so no simulated client could start; use "
                                  + ("0 (no GPU here)" if gpus == 0 else f"at most {gpus} (e.g. 1/k to share one GPU "
                                                                         "by k clients)"))

    def torch_device(self) -> str:
        """``auto`` resolves to ``cuda`` when a GPU is visible, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _declared() -> tuple[Key, ...]:
    """Every key as :class:`RunConfig` declares it, name, type and section filled in from the field."""
    types = {"int": int, "float": float, "str": str, "bool": bool}
    starts = dict(SECTIONS)
    out, section = [], ""
    for f in fields(RunConfig):
        name = _kebab(f.name)
        section = starts.get(name, section)
        out.append(dataclasses.replace(f.metadata["key"], name=name, type=types[str(f.type)], section=section))
    return tuple(out)


KEYS: tuple[Key, ...] = _declared()


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
def _number(bound: Bound | None) -> str:
    """A bound as the rule says it: ``0`` for 0.0, ``1e-05``, or a key's name."""
    if isinstance(bound, float) and bound.is_integer():
        return str(int(bound))
    return str(bound)


def _coerce(key: str, value: Any, kind: type) -> Any:
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
