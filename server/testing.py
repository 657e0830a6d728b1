"""The contract every fairforget strategy keeps, as checks any strategy class can run (in the manner of
scikit-learn's ``parametrize_with_checks``): :func:`check_strategy` runs them all, and
:func:`strategy_checks` lists the ones a class's declared capabilities call for, so that pytest can
parametrise over them (:func:`parametrize_with_checks`)::

    from server.testing import Harness, check_strategy
    check_strategy(MyStrategy, Harness(make_cfg, make_grid))

The checks drive the real training and forget drivers (:func:`server.experiment.run_training`,
:func:`server.forget.run_forget`) through a grid the caller supplies (``Harness.make_grid``: one that
calls the ClientApp's handlers in process, as ``tests/conftest.py``'s ``InProcessGrid`` does; this
module may not import ``clients/``), on a tiny run config (``Harness.make_cfg``). The class is
registered under its ``name`` for the duration of a check only. One training per class is shared by
its checks (:class:`Trial`); the determinism check trains once more, without the audit.

What is checked, by capability:

* every strategy: a run end to end (metrics, models, shard reports; train messages carry the shard
  the server assigned); the stored models are what the sites trained (``keeps_shard_models``: each
  shard's model is the one its node reported, by hash; else one global model); the sites audited the
  models the server holds (their hashes match); the strategy's predictor is what evaluation and the
  audit used (the evaluation's accuracy is the predictor's, ``predict_proba`` is ``combine`` of the
  members' outputs, and both routes called the predictor); determinism (same seed, same hashes);
* ``exact_unlearning``: a deletion retrains only the owning shard, which then equals a from-scratch
  SISA training without the ids (replayed independently, from the data's own partition and slice
  assignment, not from the node's index); untouched shards are byte-identical; the forget's
  evaluation and audit use the predictor too; over the deletion budget ``capacity-policy = refuse``
  refuses in one line and changes no model, ``retrain`` falls back to an exact retrain;
* no ``exact_unlearning``: ``forget`` is refused with the strategy's declared one-line reason, the
  run's status says so, and nothing changes.

Every failed check raises :class:`AssertionError` naming the strategy and what broke.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import strategies
from fairforget import keys, ledger
from fairforget.config import RunConfig
from fairforget.data import load_dataset, shard_of
from fairforget.requests import Request
from fairforget.run import RunDir
from fairforget.sisa import SisaSettings, SisaShard, assign_slices
from fairforget.storage import state_hash
from fairforget.unlearning import EXACT
from strategies.base import FairforgetStrategy

#: run-config keys every check adds to the harness's tiny config: a reference-free audit (cheap), and
#: a deletion budget of 3 per tiny shard (capacity-c = 0.05, width 4), so that 4 deletions exceed it
CONTRACT_CONFIG: dict[str, Any] = {"audit": True, "audit-attacks": "loss", "audit-references": 0,
                                   "audit-bootstrap": 0, "capacity-c": 0.05, "unlearn-epochs": 1}
APPROXIMATE_METHOD = "finetune"  # an approximate unlearner, charged to the deletion budget


@dataclass
class Harness:
    """What the checks need from the caller: ``make_cfg(out_dir, **overrides)`` a tiny RunConfig, and
    ``make_grid(cfg)`` a grid delivering messages to the real ClientApp handlers, recording what it
    sends in ``grid.sent``; ``root`` the folder the trials' runs are written under (default: a new
    temporary folder).

    :param make_cfg: ``make_cfg(out_dir, **overrides) -> RunConfig``, e.g. :func:`clients.testing.make_tiny_cfg`
    :param make_grid: ``make_grid(cfg) -> Grid``, e.g. :class:`clients.testing.InProcessGrid`
    :param root: where each trial's run folder is made
    """

    make_cfg: Callable[..., RunConfig]
    make_grid: Callable[[RunConfig], Any]
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fairforget-contract-")))


@contextlib.contextmanager
def registered(cls: type[FairforgetStrategy]) -> Iterator[None]:
    """``cls`` is what the strategy name ``cls.name`` resolves to while the block runs: in place of a
    built-in or an installed plugin of that name (the class under test may be a subclass or a spy of
    it), registered nowhere beyond the block."""
    with strategies.REGISTRY.substituted(cls.name, cls):
        yield


class PredictorSpy:
    """Records how the ensembles a strategy's predictor builds are used: ``combine`` called directly
    (evaluation) and ``predict_proba`` (the audit), per phase (``training``, ``forget``)."""

    def __init__(self) -> None:
        self.phase = "training"
        self.calls: dict[str, set[str]] = {}

    def wrap(self, predictor: Any) -> Callable[..., Any]:
        def build(*args: Any, **kwargs: Any) -> Any:
            ensemble = predictor(*args, **kwargs)
            self._watch(ensemble)
            return ensemble

        return build

    def _watch(self, ensemble: Any) -> None:
        combine, proba = ensemble.combine, ensemble.predict_proba
        inside = {"proba": False}

        def spied_combine(*a: Any, **k: Any) -> Any:
            if not inside["proba"]:
                self.calls.setdefault(self.phase, set()).add("combine")
            return combine(*a, **k)

        def spied_proba(*a: Any, **k: Any) -> Any:
            self.calls.setdefault(self.phase, set()).add("predict_proba")
            inside["proba"] = True
            try:
                return proba(*a, **k)
            finally:
                inside["proba"] = False

        ensemble.combine, ensemble.predict_proba = spied_combine, spied_proba


def spied(cls: type[FairforgetStrategy], spy: PredictorSpy) -> type[FairforgetStrategy]:
    """``cls`` with its predictor watched by ``spy`` (same name and capabilities)."""
    original = cls.predictor

    def predictor(self: Any) -> Any:
        return spy.wrap(original(self))

    return type(cls.__name__, (cls,), {"predictor": predictor, "__module__": cls.__module__})


class Trial:
    """One class under contract: its tiny config and, built once and shared by the checks, its
    training run (through the real driver, with the audit) and the figures read back from it.

    :param cls: the strategy class under contract (its ``name`` is what the run config selects)
    :param harness: the config and grid factories (:class:`Harness`)
    """

    def __init__(self, cls: type[FairforgetStrategy], harness: Harness) -> None:
        self.cls, self.harness = cls, harness
        self.spy = PredictorSpy()
        self.watched = spied(cls, self.spy)
        self.cfg = harness.make_cfg(harness.root / f"{cls.__name__}-{id(self)}" / "run",
                                    **{**CONTRACT_CONFIG, "strategy": cls.name})
        self.run = RunDir(self.cfg.out_path)
        self.grid: Any = None

    def fail(self, what: str) -> str:
        return f"strategy {self.cls.name!r} ({self.cls.__name__}): {what}"

    @functools.cached_property
    def trained(self) -> dict[str, Any]:
        from server.experiment import run_training

        self.grid = self.harness.make_grid(self.cfg)
        with registered(self.watched):
            run_training(self.grid, self.cfg)
        return self.run.metrics()

    @functools.cached_property
    def bundle(self) -> Any:
        return load_dataset(self.cfg)

    def hashes(self) -> dict[int, str]:
        return {k: state_hash(v) for k, v in self.run.load_models().items()}

    def model_bytes(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.run.models_dir.glob("*.pt"))}

    def strategy(self) -> FairforgetStrategy:
        return self.cls.from_config(self.cfg, self.bundle.num_classes)


# ---------------------------------------------------------------------- checks for every strategy
def check_runs_end_to_end(t: Trial) -> None:
    """A tiny run through the real training driver writes metrics, models and a report; every train
    message carries the shard the server assigned; every shard reported."""
    m = t.trained
    assert t.run.report_path.exists(), t.fail("no report written")
    for split in ("biased", "unbiased"):
        assert 0.0 <= m["ensemble"][split]["accuracy"] <= 1.0, t.fail(f"{split} accuracy out of range")
    train = [msg for msg in t.grid.sent if msg.metadata.message_type == keys.MSG_TRAIN]
    assert train and all(keys.SHARD in msg.content[keys.CONFIG] for msg in train), \
        t.fail("a train message without the server-assigned shard")
    assert sorted(s["shard"] for s in m["shards"]) == list(range(t.cfg.num_shards)), \
        t.fail(f"shard reports {[s['shard'] for s in m['shards']]}, expected one per shard")


def check_models_are_what_the_sites_trained(t: Trial) -> None:
    """``keeps_shard_models``: one stored model per shard, each the very model its node trained and
    reported (by hash): never an average. Otherwise: one global model."""
    m, hashes = t.trained, t.hashes()
    if t.cls.keeps_shard_models:
        assert sorted(hashes) == list(range(t.cfg.num_shards)), \
            t.fail(f"keeps_shard_models, but the run stored models {sorted(hashes)}")
        reported = {s["shard"]: s["model_hash"] for s in m["shards"]}
        wrong = [k for k in hashes if hashes[k] != reported.get(k)]
        assert not wrong, t.fail(f"declares keeps_shard_models, but the stored model of shard(s) {wrong} is not the "
                                 "one its site trained (averaged or replaced)")
    else:
        assert sorted(hashes) == [0], t.fail(f"keeps no shard models, but the run stored models {sorted(hashes)}")


def check_audit_targets_are_the_served_models(t: Trial) -> None:
    """Every site audited the model the server holds for it (its own shard model, or the global one):
    no site error, and its reported model hash is the stored model's."""
    sites, hashes = t.trained["privacy"]["sites"], t.hashes()
    assert len(sites) == t.cfg.num_shards, t.fail(f"site audits {sorted(sites)}, expected one per shard")
    for name, info in sites.items():
        assert "error" not in info, t.fail(f"site audit {name}: {info.get('error')}")
        served = hashes[info["shard"]] if t.cls.keeps_shard_models else hashes[0]
        assert info["model_hash"] == served, t.fail(f"site {name} audited {info['model_hash'][:12]}, the server "
                                                    f"holds {served[:12]}")


def check_predictor_is_used(t: Trial) -> None:
    """The strategy's predictor is the one evaluation and audit use: the evaluation's accuracy is the
    predictor's, its ``predict_proba`` is ``combine`` of the members' outputs (what evaluation
    computes), and during training the evaluation (``combine``) and the audit (``predict_proba``) both
    went through it."""
    m, bundle = t.trained, t.bundle
    ensemble = t.strategy().predictor()(t.run.load_models(), bundle.num_classes, t.cfg.model_width)
    x, y = bundle.test_unbiased.x, bundle.test_unbiased.y
    proba = ensemble.predict_proba(x)
    assert torch.allclose(proba, ensemble.combine(ensemble.member_probs(x)), atol=1e-6), \
        t.fail("the predictor's predict_proba is not combine(member_probs): evaluation scores another prediction "
               "than the audit")
    accuracy = float((proba.argmax(-1) == y).float().mean())
    assert abs(accuracy - m["ensemble"]["unbiased"]["accuracy"]) < 1e-9, \
        t.fail(f"evaluation reported accuracy {m['ensemble']['unbiased']['accuracy']:.4f}, the predictor gives "
               f"{accuracy:.4f}")
    used = t.spy.calls.get("training", set())
    assert used >= {"combine", "predict_proba"}, t.fail(f"the predictor was not used by evaluation and audit ({used})")


def check_deterministic(t: Trial) -> None:
    """The same config and seed trains the same models (by hash), in a fresh run folder."""
    from server.experiment import run_training

    first = t.hashes() if t.trained else {}
    again = t.harness.make_cfg(t.cfg.out_path.parent / "again", **{**CONTRACT_CONFIG, "strategy": t.cls.name,
                                                                   "audit": False})
    with registered(t.cls):
        run_training(t.harness.make_grid(again), again)
    second = {k: state_hash(v) for k, v in RunDir(again.out_path).load_models().items()}
    assert first == second, t.fail("two runs with the same seed trained different models")


# ---------------------------------------------------------------------- exact unlearning
def _replay(t: Trial, shard: int, deleted: set[int]) -> str:
    """The hash of shard ``shard`` trained from scratch without ``deleted``: its samples from the data's
    own partition (:func:`fairforget.data.shard_of`), its slices the from-scratch assignment less the
    deleted ids, in a fresh folder; nothing read from the node."""
    data = shard_of(t.cfg, t.bundle)[shard]
    ids = [int(i) for i in data.ids.tolist()]
    slices = [[i for i in sl if i not in deleted] for sl in assign_slices(ids, t.cfg.slices, t.cfg.seed, shard)]
    live = data.select_ids(sorted(set(ids) - deleted))
    settings = SisaSettings.from_config(t.cfg, t.bundle.num_classes, t.bundle.num_private)
    with tempfile.TemporaryDirectory(prefix="fairforget-contract-replay-") as tmp:
        scratch = SisaShard(Path(tmp), shard, live, settings, slices=slices)
        scratch.train_through(t.cfg.slices)
        return scratch.model_hash()


def _forget(t: Trial, ids: list[int], **changes: Any) -> Any:
    from server.forget import run_forget

    cfg = t.cfg.replace(**changes)
    grid = t.harness.make_grid(cfg)
    with registered(t.watched):
        run_forget(grid, cfg, Request.forget(ids))
    return grid


def check_exact_deletion(t: Trial) -> None:
    """A deletion goes to the owning shard's node only; that shard then equals a from-scratch training
    without the ids (an independent replay); every other shard is byte-identical; the forget's
    evaluation and audit go through the predictor."""
    assert t.trained
    owner = t.cfg.num_shards - 1
    ids = [int(i) for i in shard_of(t.cfg, t.bundle)[owner].ids[:2].tolist()]
    before = t.model_bytes()
    t.spy.phase = "forget"
    grid = _forget(t, ids, unlearn_method=EXACT)
    t.spy.phase = "training"
    sent = [m for m in grid.sent if m.metadata.message_type == keys.MSG_UNLEARN]
    assert sorted(int(m.content[keys.CONFIG][keys.SHARD]) for m in sent) == [owner], \
        t.fail(f"unlearn messages went to shard(s) {[m.content[keys.CONFIG].get(keys.SHARD) for m in sent]}, "
               f"the ids are shard {owner}'s")
    after = t.model_bytes()
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert changed == [f"shard-{owner}.pt"], t.fail(f"a deletion from shard {owner} changed {changed}")
    assert t.hashes()[owner] == _replay(t, owner, set(ids)), \
        t.fail(f"shard {owner} after the deletion is not the model trained from scratch without the ids")
    used = t.spy.calls.get("forget", set())
    assert "combine" in used, t.fail("forget's evaluation did not use the strategy's predictor")


def check_budget_refuse_and_retrain(t: Trial) -> None:
    """Past the deletion budget (3 per tiny shard), ``capacity-policy = refuse`` refuses in one line and
    changes no model; ``retrain`` serves the request by an exact retrain of the owning shard only,
    which equals the from-scratch training without the ids."""
    from server.forget import ForgetError

    assert t.trained
    ids = [int(i) for i in shard_of(t.cfg, t.bundle)[0].ids[:4].tolist()]
    before = t.model_bytes()
    try:
        _forget(t, ids, unlearn_method=APPROXIMATE_METHOD, capacity_policy="refuse")
    except ForgetError as exc:
        assert "capacity" in str(exc) and "\n" not in str(exc), t.fail(f"refusal not one line about capacity: {exc}")
    else:
        raise AssertionError(t.fail("4 deletions past a budget of 3 were not refused under capacity-policy = refuse"))
    assert t.model_bytes() == before, t.fail("a refused deletion changed a model")
    assert t.run.ledger.entries()[-1]["decision"] == ledger.REFUSED, t.fail("the ledger does not record the refusal")
    _forget(t, ids, unlearn_method=APPROXIMATE_METHOD, capacity_policy="retrain")
    row = t.run.ledger.entries()[-1]
    assert (row["decision"], row["shard"]) == (ledger.EXACT_FALLBACK, 0), \
        t.fail(f"over budget under retrain: decision {row['decision']} at shard {row['shard']}")
    after = t.model_bytes()
    assert sorted(k for k in before if before[k] != after[k]) == ["shard-0.pt"], t.fail("retrain touched other shards")
    assert t.hashes()[0] == _replay(t, 0, set(ids)), t.fail("the exact fallback is not the from-scratch model")


# ---------------------------------------------------------------------- no exact unlearning
def check_forget_is_refused(t: Trial) -> None:
    """``forget`` on a strategy without exact unlearning is refused with its declared one-line reason;
    the run's status says so, and no model or ledger line changes."""
    from server.app import run_driver

    assert t.trained
    before, lines = t.model_bytes(), len(t.run.ledger.lines())
    ids = [int(t.bundle.train.ids[0])]
    with registered(t.watched):
        run_driver(t.harness.make_grid(t.cfg), t.cfg, Request.forget(ids))
    status = t.run.status() or {}
    expected = strategies.refusal(t.cls, t.cls.name)
    assert status.get("ok") is False and status.get("error") == expected, \
        t.fail(f"forget not refused with the declared reason: status {status}")
    assert "\n" not in expected and t.cls.forget_refusal in expected, t.fail("the refusal is not one line")
    assert t.model_bytes() == before and len(t.run.ledger.lines()) == lines, t.fail("a refused forget changed the run")


# ---------------------------------------------------------------------- selection
COMMON = [check_runs_end_to_end, check_models_are_what_the_sites_trained, check_audit_targets_are_the_served_models,
          check_predictor_is_used, check_deterministic]


def strategy_checks(cls: type[FairforgetStrategy]) -> list[Callable[[Trial], None]]:
    """The checks ``cls``'s declared capabilities call for, in the order they run."""
    if cls.exact_unlearning and not cls.keeps_shard_models:
        return [_inconsistent]
    extra = ([check_exact_deletion, check_budget_refuse_and_retrain] if cls.exact_unlearning
             else [check_forget_is_refused])
    return [*COMMON, *extra]


def _inconsistent(t: Trial) -> None:
    raise AssertionError(t.fail("declares exact_unlearning without keeps_shard_models"))


def trial_cache(harness: Harness) -> Callable[[type[FairforgetStrategy]], Trial]:
    """``trials(cls)``: one :class:`Trial` per class on ``harness``, built on first use and shared by that
    class's checks (one training each), as a module-scoped pytest fixture returns it::

        @pytest.fixture(scope="module")
        def trials(tmp_path_factory):
            return trial_cache(Harness(make_tiny_cfg, InProcessGrid, tmp_path_factory.mktemp("contract")))
    """
    cache: dict[type, Trial] = {}
    return lambda cls: cache.setdefault(cls, Trial(cls, harness))


def check_strategy(cls: type[FairforgetStrategy], harness: Harness) -> None:
    """Run every check the strategy class ``cls`` is subject to (by what it declares), on one shared
    training built with ``harness`` (:class:`Harness`); the first failure raises AssertionError."""
    trial = Trial(cls, harness)
    for check in strategy_checks(cls):
        check(trial)


def parametrize_with_checks(classes: list[type[FairforgetStrategy]]) -> Any:
    """``@parametrize_with_checks(classes)``: one pytest case per (class, check) for each strategy class
    in ``classes``, named ``Class-check``;
    the test receives ``cls`` and ``check`` and calls ``check(trial)`` on a :class:`Trial` it shares
    per class (see ``tests/test_strategies.py``)."""
    import pytest

    cases = [(cls, check) for cls in classes for check in strategy_checks(cls)]
    return pytest.mark.parametrize(("cls", "check"), cases,
                                   ids=[f"{c.__name__}-{k.__name__.removeprefix('check_')}" for c, k in cases])
