"""The accuracy-weighted shard ensemble (fairforget_examples.weighted_ensemble) and its validation split
(fairforget_examples.validation_data): the contract suite in process, the split's disjointness, the
weights by hand, the weights reaching the evaluation, and one line for each bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fairforget_examples import validation_data
from fairforget_examples.weighted_ensemble import AccuracyWeightedEnsemble, ValidationWeightedPredictor

import strategies
from clients.testing import InProcessGrid, make_tiny_cfg
from fairforget.config import ConfigError
from fairforget.data import biased_digits, shard_of
from fairforget.model import load_model
from fairforget.requests import Request
from fairforget.unlearning import EXACT
from server.testing import Harness, parametrize_with_checks, registered, trial_cache

DATASET = "biased-digits-val"
#: sharp weights, so that the weighted ensemble predicts measurably unlike the even one on the tiny run
OPTIONS = '{"weighting": "softmax-accuracy", "temperature": 0.01}'


def tiny_cfg(out, **overrides):
    return make_tiny_cfg(out, **{"dataset": DATASET, "strategy-options": OPTIONS, **overrides})



@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    return trial_cache(Harness(tiny_cfg, InProcessGrid, tmp_path_factory.mktemp("weighted-contract")))


@parametrize_with_checks([AccuracyWeightedEnsemble])
def test_contract_suite(cls, check, trials):
    check(trials(cls))


# ---------------------------------------------------------------------- the validation split
def test_validation_split_is_its_own():
    """Disjoint by record id from train, heldout and both test sets; train and heldout are the default
    data's; the split is a fixed fraction of the test digits, deterministic in the seed."""
    cfg = tiny_cfg("unused")
    bundle, val = validation_data.load(cfg), validation_data.validation(cfg)
    rec = set(validation_data.record_ids(val, unbiased=True).tolist())
    for name, samples, unbiased in (("train", bundle.train, False), ("heldout", bundle.heldout, False),
                                    ("test_biased", bundle.test_biased, False),
                                    ("test_unbiased", bundle.test_unbiased, True)):
        assert not rec & set(validation_data.record_ids(samples, unbiased).tolist()), name
    default = biased_digits.load(cfg)
    assert torch.equal(bundle.train.x, default.train.x) and torch.equal(bundle.train.ids, default.train.ids)
    assert torch.equal(bundle.heldout.ids, default.heldout.ids)
    test_digits = set(default.test_biased.ids.tolist())
    assert rec <= test_digits and 0.2 < len(rec) / len(test_digits) < 0.4
    assert len(bundle.test_biased) + len(rec) == len(default.test_biased)
    assert len(val) == 10 * len(rec) and sorted(set((val.ids % 10).tolist())) == list(range(10))  # every colour
    other = set(validation_data.record_ids(validation_data.validation(tiny_cfg("unused", seed=1)), True).tolist())
    assert other != rec and len(other & rec) > 0  # another seed draws another split


def test_sites_workload_holds_one_unbiased_site():
    cfg = tiny_cfg("unused")
    bundle = validation_data.load_sites(cfg)
    sites = bundle.train.site.numpy()
    assert sorted(set(sites.tolist())) == list(range(validation_data.SITES))
    own = (bundle.train.private == bundle.train.y).numpy()
    assert own[sites == validation_data.SITES - 1].mean() < 0.2 < 0.9 < own[sites != validation_data.SITES - 1].mean()
    assert torch.equal(bundle.train.ids, validation_data.load(cfg).train.ids)


# ---------------------------------------------------------------------- the weights
def _by_hand(states, val, width):
    accs = {}
    for k, state in states.items():
        with torch.no_grad():
            accs[k] = float((load_model(state, 10, width)(val.x).argmax(-1) == val.y).float().mean())
    return accs


def test_weights_are_the_validation_accuracies(trials):
    t = trials(AccuracyWeightedEnsemble)
    assert t.trained
    states, val = t.run.load_models(), validation_data.validation(t.cfg)
    accs = _by_hand(states, val, t.cfg.model_width)
    plain = ValidationWeightedPredictor(validation=val)(states, 10, t.cfg.model_width)
    assert plain.weights == pytest.approx(accs, abs=1e-9)
    sharp = t.strategy().predictor()(states, 10, t.cfg.model_width)
    best = max(accs.values())
    assert sharp.weights == pytest.approx({k: math.exp((a - best) / 0.01) for k, a in accs.items()})


def test_evaluation_scores_the_weighted_combination_before_and_after_a_deletion(trials):
    """The run's reported ensemble accuracy is that of the validation-weighted mean of the shard models'
    softmax outputs (not the even mean), and after a deletion retrains a shard it is the reweighted one's."""
    from server.forget import run_forget

    t = trials(AccuracyWeightedEnsemble)
    assert t.trained
    val, test = validation_data.validation(t.cfg), t.bundle.test_unbiased

    def check() -> None:
        states = t.run.load_models()
        accs = _by_hand(states, val, t.cfg.model_width)
        w = torch.tensor([math.exp((accs[k] - max(accs.values())) / 0.01) for k in sorted(states)])
        with torch.no_grad():
            probs = torch.stack([load_model(states[k], 10, t.cfg.model_width)(test.x).softmax(-1)
                                 for k in sorted(states)])
        weighted = float((((w / w.sum()).view(-1, 1, 1) * probs).sum(0).argmax(-1) == test.y).float().mean())
        even = float((probs.mean(0).argmax(-1) == test.y).float().mean())
        assert weighted != even  # the tiny run's shard models disagree enough for the weights to show
        assert t.run.metrics()["ensemble"]["unbiased"]["accuracy"] == pytest.approx(weighted, abs=1e-9)

    check()
    ids = [int(i) for i in shard_of(t.cfg, t.bundle)[0].ids[10:50].tolist()]  # none the suite deletes
    with registered(AccuracyWeightedEnsemble):
        run_forget(InProcessGrid(t.cfg), t.cfg.replace(unlearn_method=EXACT), Request.forget(ids))
    check()


# ---------------------------------------------------------------------- bad input
def _one_line(cfg, *words):
    with pytest.raises(ConfigError) as err:
        AccuracyWeightedEnsemble.from_config(cfg, 10)
    msg = str(err.value)
    assert "\n" not in msg and "weighted-ensemble" in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize(("overrides", "words"), [
    ({"dataset": "biased-digits"}, ("'dataset'", "biased-digits-val")),
    ({"strategy-options": '{"weighting": "best"}'}, ("'strategy-options'", "'weighting'", "softmax-accuracy")),
    ({"strategy-options": '{"temperature": 0}'}, ("'strategy-options'", "'temperature'", "> 0")),
    ({"strategy-options": '{"temperature": "hot"}'}, ("'strategy-options'", "'temperature'", "float")),
    ({"strategy-options": '{"temp": 0.1}'}, ("'strategy-options'", "'temp'", "temperature")),
])
def test_bad_input_is_one_line(overrides, words):
    _one_line(tiny_cfg("unused", **overrides), *words)


def test_refused_without_data_on_the_server():
    cfg = tiny_cfg("unused")
    _one_line(SimpleNamespace(**{f: getattr(cfg, f) for f in ("dataset", "strategy_options")}, server_has_data=False),
              "'dataset'", "server holds no data")


def test_found_by_entry_point_and_module_path():
    assert strategies.strategy_class("weighted-ensemble") is AccuracyWeightedEnsemble
    path = "fairforget_examples.weighted_ensemble:AccuracyWeightedEnsemble"
    built = strategies.build_strategy(tiny_cfg("unused", strategy=path), 10)
    assert isinstance(built, AccuracyWeightedEnsemble) and built.weighting == "softmax-accuracy"
    module_path = tiny_cfg("unused", dataset="fairforget_examples.validation_data:load", strategy=path)
    assert isinstance(AccuracyWeightedEnsemble.from_config(module_path, 10), AccuracyWeightedEnsemble)
    assert np.isclose(built.temperature, 0.01)
