"""Plugins: strategies, objectives, unlearners, attacks and datasets from anywhere, through one mechanism.

Each kind has one :class:`Registry`: the run-config key that names it, its built-ins, its entry-point
group and what a valid plugin of that kind is. A name in the run config is resolved as

1. ``"package.module:Attr"`` (``Attr`` may be dotted): imported as it is, no registration needed;
2. a built-in name;
3. the name of an entry point in the kind's group, registered by an installed package::

       [project.entry-points."fairforget.objectives"]
       focal = "my_package.focal:Focal"

   Only the entry point asked for is imported (never every plugin of the group): a broken plugin
   breaks only the runs that ask for it.

=============  ==================  ======================  ============================================
kind           run-config key      entry-point group       a plugin is
=============  ==================  ======================  ============================================
strategy       ``strategy``        fairforget.strategies   a ``strategies.base.FairforgetStrategy`` subclass
objective      ``objective``       fairforget.objectives   a ``fairforget.objectives.Objective`` subclass
                                                           with a ``name``
unlearner      ``unlearn-method``  fairforget.unlearners   a module or object with ``NAME``, ``EXACT``
                                                           (True or False), ``check(shard, ids, params=None)``
                                                           and ``unlearn(shard, ids, params=None)``
attack         ``audit-attacks``   fairforget.attacks      a ``fairforget.audit.Attack`` subclass with a ``name``
dataset        ``dataset``         fairforget.datasets     a callable ``load(data_cfg) -> DataBundle`` (or a
                                                           module with one)
=============  ==================  ======================  ============================================

Everything that can go wrong is one :class:`~fairforget.config.ConfigError` line naming the
run-config key and the plugin: a module path or entry point that fails to import, an object of the
wrong kind, two installed plugins registering one name, a plugin registering a built-in's name (refused
when that name is asked for, never silently shadowed), an unknown name (with the names there are).

**Options.** The SuperLink refuses run-config keys the app does not declare, so a plugin cannot add
keys of its own: each kind has one declared key holding a JSON object of the chosen plugin's own
parameters, ``strategy-options``, ``objective-options``, ``unlearner-options``, ``dataset-options``
and ``attack-options`` (keyed by attack name: ``{"my-attack": {"k": 3}}``). The plugin declares
``options`` (option name -> default; a module-level ``options`` for a module, an attribute of the
callable for a dataset ``load``); a given value must have its default's type (an int is taken for a
float). :func:`parse_plugin_options` checks them: an unknown or mistyped option is one line naming the
key, the plugin and the option. The plugin receives every declared option, defaults filled in:

* a strategy: ``cls.parse_options(cfg.strategy_options)`` in its ``from_config``;
* an objective: ``self.ctx.options`` (beside the built-ins' flat keys ``end-alpha``, ...);
* an unlearner: ``params.options`` (:class:`fairforget.unlearning.approximate.UnlearnParams`); a
  deletion served by another method (the exact fallback of a spent deletion budget) gets that
  method's defaults;
* an attack: ``self.options`` of the instance :func:`fairforget.audit.build_attack` makes;
* a dataset: ``data_cfg.dataset_options``.

The built-ins keep their flat run-config keys and declare no options. :func:`check_options` checks
every kind's options before anything is written (``strategies.check_config``: the ServerApp and the
``fairforget`` command); each kind also checks its own where it is built.

**Where each kind must be installed** (found from where the code resolves each one):

* a **strategy** where the ServerApp runs (``server/experiment.py``, ``server/forget.py`` and
  ``server/audit.py`` build it) and where the ``fairforget`` command runs (its preflight); never at
  the sites: a ClientApp learns what it needs (the audit target, the model to evaluate) from the
  messages.
* an **objective** at every site (the ClientApp trains its SISA shard with it, trains its site
  audit's reference models and its augmentation filter with it), where ``fairforget simulate`` runs
  (its preflight builds it) and where ``fairforget verify`` runs (it replays the shards' training);
  on the ServerApp's machine too when the server holds the data (``RunConfig.server_has_data``) and
  its audit trains reference models (``fairforget/audit/references.py``).
* an **unlearner** at every site (``clients/handlers.py`` ``unlearn`` runs its ``check`` and
  ``unlearn``) and where the ServerApp runs: the strategy decides before sending a deletion whether
  the method is exact or is charged to the shard's deletion budget (``EXACT``); ``fairforget
  forget`` checks it too.
* an **attack** where the audit runs: the ServerApp when the server holds the data
  (``fairforget/audit/suite.py``), every site for its own site audit (``clients/handlers.py``
  ``audit``), and where ``fairforget audit`` runs.
* a **dataset** at every site (``clients/node.py`` loads the site's data with it), where the
  ``fairforget`` command runs (preflight, ``forget``, ``audit``, ``verify``), and where the ServerApp
  runs when the server holds the data.

A plugin of a site kind that is not installed where the ServerApp runs is skipped by that process's
:func:`check_options` and checked at each site when the site builds it (before it trains).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from fairforget.config import ConfigError

T = TypeVar("T")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def parse_plugin_options(key: str, owner: str, declared: Mapping[str, Any],
                         given: str | Mapping[str, Any]) -> dict[str, Any]:
    """Every option ``declared`` (name -> default), the defaults overridden by ``given`` (the JSON text
    of run-config key ``key``, or the mapping already read from it). ``owner`` names the plugin in the
    messages (``"strategy 'robust'"``). An unknown option, or one whose value has not its default's
    type (an int is taken for a float), is a one-line ConfigError naming the key, the plugin and the
    option."""
    if isinstance(given, str):
        values = json_object(key, given, "of options")
    elif isinstance(given, Mapping):
        values = dict(given)
    else:
        raise ConfigError(f"config key '{key}': the options of {owner} = {given!r}: must be a JSON object")
    unknown = sorted(set(values) - set(declared))
    if unknown:
        takes = f"its options: {', '.join(sorted(declared))}" if declared else "it takes none"
        raise ConfigError(f"config key '{key}': {owner} has no option {unknown[0]!r} ({takes})")
    out = dict(declared)
    for name, value in values.items():
        default = declared[name]
        number = isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)
        if not (number or type(value) is type(default)):
            raise ConfigError(f"config key '{key}': option {name!r} of {owner} = {value!r}: "
                              f"expected {type(default).__name__}")
        out[name] = float(value) if number else value
    return out


def json_object(key: str, text: str, what: str) -> dict[str, Any]:
    """The JSON object run-config key ``key`` holds (``""``: empty); anything else is a one-line
    ConfigError saying it must be \"\" or a JSON object ``what`` (e.g. "of options")."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' = {text!r}: must be \"\" or a JSON object {what}")
    return value


def declared_options(obj: Any) -> Mapping[str, Any]:
    """What the plugin ``obj`` declares as its ``options`` (none: ``{}``); a non-mapping is taken as none."""
    options = getattr(obj, "options", None)
    return options if isinstance(options, Mapping) else {}


class Registry(Generic[T]):
    """The plugins of one kind: ``builtins`` (kept by reference: a test may add to the dict), the
    entry-point ``group``, and ``check(obj)``, whether a loaded object is a plugin of this kind
    (``expected`` says what one is, for the message); ``adapt`` turns a valid plugin into what
    :meth:`resolve` returns (the built-ins are stored adapted already).

    :param kind: the kind's name in messages (``"objective"``)
    :param key: the run-config key that names a plugin of this kind (``"objective"``, ``"unlearn-method"``)
    :param builtins: name -> built-in plugin
    :param check: whether a loaded object is a plugin of this kind
    :param expected: what a plugin of this kind is, for the message when ``check`` says no
    :param options_key: the run-config key of the plugin's own options (default ``"<kind>-options"``)
    :param group: the entry-point group (default ``"fairforget.<kind>s"``)
    :param adapt: turns a valid loaded plugin into what :meth:`resolve` returns (default: as it is)
    :param modules: whether a plugin may be a module, so that a dotted ``package.module`` names one
    """

    def __init__(self, kind: str, key: str, builtins: Mapping[str, T], *, check: Callable[[Any], bool],
                 expected: str, options_key: str | None = None, group: str | None = None,
                 adapt: Callable[[Any], T] | None = None, modules: bool = False) -> None:
        self.kind = kind
        self.key = key
        self.builtins = builtins
        self.check = check
        self.expected = expected
        self.options_key = options_key or f"{kind}-options"
        self.group = group or f"fairforget.{kind}s"
        self.adapt = adapt
        self.modules = modules  # a plugin may be a module: "package.module" (no ":Attr") names one too
        self._scan: tuple[Any, list[Any]] | None = None  # (the entry_points function, its answer)
        self._substitutes: dict[str, T] = {}  # name -> what stands in for it (:meth:`substituted`)

    @contextlib.contextmanager
    def substituted(self, name: str, obj: T) -> Iterator[None]:
        """``name`` resolves to ``obj`` while the block runs, before built-ins and entry points: how a
        contract suite puts the class under test (a subclass, a spy) in place of a built-in or an
        installed plugin of that name, without registering anything beyond the block."""
        before = self._substitutes.get(name)
        self._substitutes[name] = obj
        try:
            yield
        finally:
            if before is None:
                self._substitutes.pop(name, None)
            else:
                self._substitutes[name] = before

    # ------------------------------------------------------------------ discovery
    def entry_points(self) -> list[Any]:
        """The group's entry points, none of them loaded. Read once per process (per
        ``importlib.metadata.entry_points``: a test that replaces it is read again)."""
        scan = importlib.metadata.entry_points  # looked up at call time: tests monkeypatch it
        if self._scan is None or self._scan[0] is not scan:
            self._scan = (scan, list(scan(group=self.group)))
        return self._scan[1]

    def names(self) -> list[str]:
        """The built-in names and the installed plugins' (for "must be one of ..."), sorted."""
        return sorted({*self.builtins, *(ep.name for ep in self.entry_points())})

    def _entry_point(self, name: str) -> Any | None:
        """The entry point registered as ``name`` (None: none); a name two plugins register, or a
        plugin registers beside a built-in, is a one-line ConfigError naming both."""
        values: list[str] = []
        found = None
        for ep in self.entry_points():
            if ep.name == name and ep.value not in values:  # one package seen twice on the path is one
                values.append(ep.value)
                found = found or ep
        if values and name in self.builtins:
            raise ConfigError(f"config key '{self.key}': plugin {values[0]!r} registers {name!r}, the name of a "
                              f"built-in {self.kind}")
        if len(values) > 1:
            raise ConfigError(f"config key '{self.key}': two plugins register {name!r}: {values[0]!r} and "
                              f"{values[1]!r}")
        return found

    # ------------------------------------------------------------------ resolution
    def resolve(self, name: str) -> T:
        """The plugin ``name`` names: ``package.module:Attr``, a built-in, or an installed entry point;
        a one-line ConfigError naming the run-config key and the plugin otherwise."""
        if name in self._substitutes:
            return self._substitutes[name]
        if self._is_path(name):
            return self._checked(name, self._import(name), name)
        ep = self._entry_point(name)  # first: a plugin that takes a built-in name is refused, never shadowed
        if name in self.builtins:
            return self.builtins[name]
        if ep is None:
            raise ConfigError(f"config key '{self.key}' = {name!r}: must be one of {', '.join(self.names())}")
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure of a plugin is one line
            raise ConfigError(f"config key '{self.key}' = {name!r}: plugin {ep.value!r} (entry point group "
                              f"{self.group}) fails to import: {_first_line(exc)}") from None
        return self._checked(name, obj, ep.value)

    def find(self, name: str) -> T | None:
        """:meth:`resolve`, or None where ``name`` names nothing installed in this process (no built-in,
        no entry point of that name, a module path whose module is not here): a plugin of a site's
        kind checked where it may not be installed. A broken plugin, one of the wrong kind or a
        conflict still raises."""
        if name in self._substitutes:
            return self._substitutes[name]
        if self._is_path(name):
            if not _importable(name.partition(":")[0]):
                return None
        elif name not in self.builtins and not any(ep.name == name for ep in self.entry_points()):
            return None
        return self.resolve(name)

    def _is_path(self, name: str) -> bool:
        """Whether ``name`` is an import path: ``package.module:Attr``, or (a kind whose plugin may be a
        module) a dotted ``package.module`` that is no built-in and no entry point's name."""
        if ":" in name:
            return True
        return (self.modules and "." in name and name not in self.builtins
                and not any(ep.name == name for ep in self.entry_points()))

    def known(self, name: str) -> bool:
        """Whether ``name`` resolves here (an unknown name: False; a broken plugin still raises)."""
        return self.find(name) is not None

    def parse_options(self, name: str, declared: Mapping[str, Any], given: str | Mapping[str, Any]) -> dict[str, Any]:
        """:func:`parse_plugin_options` for this kind's options key, naming ``<kind> 'name'``: the options
        ``declared`` (option name -> default) overridden by ``given`` (the key's JSON text, or a mapping)."""
        return parse_plugin_options(self.options_key, f"{self.kind} {name!r}", declared, given)

    def _import(self, path: str) -> Any:
        """The object ``package.module:Attr`` (or the module ``package.module``) names; one-line
        ConfigError if it cannot be imported."""
        module, _, attr = path.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - a missing module, a failing import, a missing attribute
            raise ConfigError(f"config key '{self.key}' = {path!r}: cannot import it: {_first_line(exc)}") from None
        return obj

    def _checked(self, name: str, obj: Any, origin: str) -> T:
        try:
            ok = bool(self.check(obj))
        except Exception:  # noqa: BLE001 - a check that trips over an odd object: not a plugin
            ok = False
        if not ok:
            raise ConfigError(f"config key '{self.key}' = {name!r}: {origin} is not {self.expected}")
        return self.adapt(obj) if self.adapt is not None else obj

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, key={self.key!r}, group={self.group!r}, builtins={sorted(self.builtins)})"


def _importable(module: str) -> bool:
    """Whether ``module`` is installed here (a failure other than its absence counts as installed, so
    that resolving it reports the failure)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - a parent package that fails to import: resolve says how
        return True


def check_options(cfg: Any) -> None:
    """The options of every plugin ``cfg`` (a RunConfig) names, against what each declares: the
    objective, the unlearner, the dataset and the audit's attacks (the strategy's are checked by
    ``strategies.check_config``, which calls this). A plugin of a site's kind not installed in this
    process is skipped here and checked where it is built."""
    from fairforget.audit import check_attack_options
    from fairforget.data import check_dataset_options
    from fairforget.objectives import check_objective_options
    from fairforget.unlearning import check_unlearner_options

    check_objective_options(cfg)
    check_unlearner_options(cfg)
    check_dataset_options(cfg)
    check_attack_options(cfg)


__all__ = ["Registry", "check_options", "declared_options", "parse_plugin_options"]
