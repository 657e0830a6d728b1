"""DP-SGD's randomness is the site's secret, and a site's privacy settings are its own (issue 21,
parts 1 and 4), tested as an attacker and as an operator would try them:

* a server that knows the run's ``seed`` (and the data, and the code) rebuilds a site's DP training
  with every seed it can derive from the public config, the old ``derived_seed`` scheme included: it
  must not reproduce the site's model; the site, with the seeds it recorded (mode 0600, in no reply,
  in no log), replays it bit for bit;
* a retrain of a stage never reuses the noise of the training it replaces, nor keeps it;
* a later run that lifts ``dp-max-epsilon`` or ``dp-delta`` (or drops DP) is refused at the site, in
  one line, with its state byte-identical;
* DP with a batch-coupled objective (EnD) is refused by the validation the ServerApp and every
  ClientApp run, not only by the command; ``inf``, ``nan`` and unicode digits are one-line errors;
* an empty Poisson batch takes its noisy step: steps taken == steps accounted;
* verification: the server reports a DP shard ``site-only`` (never ``match``), a simulation's
  ``--site-local`` and a deployment site's ``--state-dir`` replay it with the recorded seeds.

Tiny configurations, CPU only."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from clients import handlers
from clients.node import Node
from fairforget import keys
from fairforget.config import ConfigError, RunConfig, parse_ids, resolve
from fairforget.data import load_dataset, shard_of
from fairforget.model import build_model
from fairforget.objectives import ObjectiveContext, build_objective
from fairforget.privacy import DPSGD
from fairforget.sisa import DP_SEEDS_FILE, DP_SETTINGS_FILE, SisaError, SisaSettings, SisaShard, derived_seed
from fairforget.storage import state_hash
from fairforget.training import OptimizerSpec, train
from fairforget.unlearning import UNLEARNERS, exact
from fairforget.unlearning.approximate import UnlearnParams
from server import cli
from tests.conftest import TINY
from tests.fixtures_formats import CLASS_RGB, write_png

DP = {"dp": True, "dp-noise-multiplier": 1.0, "dp-accountant": "rdp", "audit": False}


def _cfg(tmp_path: Path, **kw) -> RunConfig:
    return resolve({**TINY, **DP, "out-dir": str(tmp_path / "run"), **kw})


def _node(cfg: RunConfig, shard: int = 0, **node_config) -> Node:
    conf = {keys.NODE_PARTITION_ID: shard, keys.NODE_NUM_PARTITIONS: cfg.num_shards, **node_config}
    return Node.from_context(cfg.to_mapping(), conf)


def _stage_msg(stage: int) -> RecordDict:
    return RecordDict({keys.CONFIG: ConfigRecord({keys.TRAIN_MODE: keys.TRAIN_MODE_SISA, keys.STAGE: stage})})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _attack(cfg: RunConfig, data, seeds: tuple[int, int], folder: Path) -> str:
    """The attacker's rebuild of stage 1 of shard 0, with the site's data, code and config and the
    Poisson-mask and noise seeds ``seeds``; the model's hash."""
    bundle = load_dataset(cfg)
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    shard = SisaShard(folder, 0, data, settings, replay_seeds={1: seeds})
    shard.train_stage(1)
    return shard.model_hash()


# ---------------------------------------------------------------------- (a) the server cannot redraw the noise
def test_a_server_knowing_the_run_seed_cannot_reproduce_the_sites_dp_noise(tmp_path, caplog, capsys):
    cfg = _cfg(tmp_path, slices=1)
    node = _node(cfg)
    caplog.set_level(logging.DEBUG)
    reply = handlers.train(_stage_msg(1), node)  # the site trains, through its ClientApp handler
    served = state_hash(reply[keys.ARRAYS].to_torch_state_dict())
    state = node.state_dir
    path = state / DP_SEEDS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # readable by the site's own user only
    recorded = json.loads(path.read_text())["stages"]["1"]
    secret = (int(recorded["sample_seed"]), int(recorded["noise_seed"]))
    # never sent, never logged: no reply record and no log line holds either seed
    sent = json.dumps({k: dict(v) for k, v in reply.config_records.items()}, default=str)
    sent += json.dumps({k: dict(v) for k, v in reply.metric_records.items()}, default=str)
    said = caplog.text + "".join(capsys.readouterr())
    for seed in secret:
        assert str(seed) not in sent and str(seed) not in said

    # the attacker: the run's seed, the shard and stage numbers, and the ways the code derives seeds
    # from them (the old scheme of the shards' DP-SGD, the audit's reference models', the epochs')
    s, old = cfg.seed, derived_seed(cfg.seed, 0, 1, 4242)
    guesses = {(old, old + 1), (s, s + 1), (derived_seed(s, 0, 1, 1), derived_seed(s, 0, 1, 2))}
    data = shard_of(cfg, load_dataset(cfg))[0]
    for i, guess in enumerate(sorted(guesses)):
        assert _attack(cfg, data, guess, tmp_path / f"attack-{i}") != served, f"the noise was public: {guess}"
    # the same rebuild with the site's recorded seeds is the served model, bit for bit: only the
    # seeds were missing (and the site can replay its own training)
    assert _attack(cfg, data, secret, tmp_path / "site-replay") == served


# ---------------------------------------------------------------------- (b) retrains draw fresh noise
def test_retraining_a_stage_draws_fresh_seeds_and_forgets_the_replaced_ones(tmp_path):
    cfg = _cfg(tmp_path)
    node = _node(cfg)
    shard = node.sisa
    shard.train_through()
    first = shard.recorded_seeds()
    second_slice = shard.index["slices"][1]
    exact.unlearn(shard, [second_slice[0]])  # stage 2 retrained
    second = shard.recorded_seeds()
    exact.unlearn(shard, [second_slice[1]])  # stage 2 retrained again
    third = shard.recorded_seeds()
    assert first[1] == second[1] == third[1]  # stage 1 was not retrained: its checkpoint's seeds stay
    drawn = [*first[2], *second[2], *third[2]]
    assert len(set(drawn)) == len(drawn) == 6  # no retrain reused a seed of the training it replaced
    text = (shard.dir / DP_SEEDS_FILE).read_text()
    assert all(str(seed) not in text for seed in (*first[2], *second[2]))  # nor kept it
    assert stat.S_IMODE((shard.dir / DP_SEEDS_FILE).stat().st_mode) == 0o600
    # exact unlearning, replayable at the site: a from-scratch training on the live slices with the
    # recorded seeds is the retrained model
    scratch = SisaShard(tmp_path / "scratch", 0, shard.data.select_ids(sorted(shard.live_ids())),
                        node.sisa_settings, slices=shard.index["slices"], replay_seeds=third)
    scratch.train_through()
    assert scratch.model_hash() == shard.model_hash()
    # an approximate unlearner's DP epochs draw (and record) fresh seeds too
    params = UnlearnParams(epochs=1, lr=1e-3, newton_lambda=1.0, eps=1.0, delta=1e-5)
    UNLEARNERS["finetune"](shard, [shard.index["slices"][0][0]], params)
    approx = json.loads((shard.dir / DP_SEEDS_FILE).read_text())["approximate"]
    assert len(approx) == 1 and approx[0]["index_version"] == shard.index["version"]
    assert {approx[0]["sample_seed"], approx[0]["noise_seed"]}.isdisjoint(drawn)


# ---------------------------------------------------------------------- (c) the site's settings are fixed
@pytest.mark.parametrize(("key", "lifted"), [("dp-max-epsilon", 1e6), ("dp-delta", 0.5), ("dp", False)])
def test_a_later_run_that_lifts_the_sites_privacy_settings_is_refused_at_the_site(tmp_path, key, lifted):
    cfg = _cfg(tmp_path, slices=1)
    node = _node(cfg)
    handlers.train(_stage_msg(1), node)
    fixed = json.loads((node.state_dir / DP_SETTINGS_FILE).read_text())
    assert fixed["dp-max-epsilon"] == cfg.dp_max_epsilon and fixed["dp-delta"] == cfg.dp_delta
    before = _files(node.state_dir)
    # a forget (or any second) run whose run config lifts the cap or delta: what its ClientApp runs first
    later = resolve({**cfg.to_mapping(), key: lifted})
    with pytest.raises(SisaError) as err:
        handlers.train(_stage_msg(1), _node(later))
    message = str(err.value)
    assert "\n" not in message and f"{key} = " in message and "refused, nothing changed" in message
    assert _files(node.state_dir) == before  # byte-identical
    assert _node(cfg).sisa.trained == 1  # and the site still serves under its own settings


def test_a_dp_run_on_a_shard_trained_without_dp_is_refused(tmp_path):
    plain = resolve({**TINY, "slices": 1, "audit": False, "out-dir": str(tmp_path / "run")})
    _node(plain).sisa.train_through()
    before = _files(_node(plain).state_dir)
    with pytest.raises(SisaError, match="trained without DP"):
        _ = _node(resolve({**plain.to_mapping(), **DP})).sisa
    assert _files(_node(plain).state_dir) == before


# ---------------------------------------------------------------------- (d) one validation for every route
def test_dp_with_a_batch_coupled_objective_is_refused_by_every_route(tmp_path):
    mapping = {**_cfg(tmp_path).to_mapping(), "objective": "end"}
    from strategies import build_strategy  # the strategy declares its DP mechanism (DP-SGD at the sites)

    with pytest.raises(ConfigError, match="objective 'end' couples the samples of a batch") as err:
        build_strategy(RunConfig.from_mapping(mapping), 10)  # what the ServerApp and the command run
    assert "\n" not in str(err.value)
    with pytest.raises(SisaError, match="couples the samples"):  # what every site's DP-SGD training runs
        _node_from_mapping(mapping).sisa.train_stage(1)
    with pytest.raises(ConfigError, match="couples the samples"):  # rebias too
        build_strategy(RunConfig.from_mapping({**mapping, "objective": "rebias"}), 10)
    build_strategy(RunConfig.from_mapping({**mapping, "dp": False}), 10)  # EnD without DP is fine
    build_strategy(RunConfig.from_mapping({**mapping, "strategy": "fedavg"}), 10)  # user-level DP: whole updates


def _node_from_mapping(mapping):
    return Node.from_context(mapping, {keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: 2})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("key", ["dp-max-epsilon", "dp-delta", "dp-noise-multiplier", "lr", "reply-timeout"])
def test_inf_and_nan_are_refused_where_a_finite_number_is_meant(tmp_path, key, value):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({**_cfg(tmp_path).to_mapping(), key: value})
    assert f"config key '{key}'" in str(err.value) and "finite" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="finite"):  # a copy changed in code is validated alike
        _cfg(tmp_path).replace(**{key.replace("-", "_"): value})


def test_inf_from_the_command_line_and_unicode_digits_are_one_line_errors(tmp_path, capsys):
    code = cli.main(["simulate", "--out", str(tmp_path / "run"), "--set", "dp-max-epsilon=inf"])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE and "\n" not in err and "'dp-max-epsilon' = inf: expected a finite number" in err
    assert not (tmp_path / "run").exists()
    for text in ("3,²", "١٢", "4,٣", "7\u00b9"):
        with pytest.raises(ConfigError, match="non-negative integers") as err:
            parse_ids(text)
        assert "\n" not in str(err.value)
    assert parse_ids(" 3, 17 ,42") == [3, 17, 42]


def test_secure_mode_is_refused_with_its_reason():
    with pytest.raises(ConfigError) as err:
        resolve({"dp": True, "dp-secure-mode": True})
    message = str(err.value)
    assert "torchcsprng" in message and "torch 2.14" in message and "secure randomness" in message
    assert "\n" not in message


# ---------------------------------------------------------------------- (e) empty Poisson batches
class _Watched(DPSGD):
    """DP-SGD that records each batch's size and whether the optimizer's step changed the model."""

    def attach(self, model, optimizer, loader):
        model, optimizer, loader = super().attach(model, optimizer, loader)
        self.batches, self.stepped = [], []
        inner_iter, inner_step = loader.__iter__, optimizer.step

        def batches():
            for batch in inner_iter():
                self.batches.append(len(batch))
                yield batch

        def step(*args, **kwargs):
            before = [p.detach().clone() for p in model.parameters()]
            out = inner_step(*args, **kwargs)
            self.stepped.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)))
            return out

        loader.__iter__ = batches
        optimizer.step = step
        return model, optimizer, _Iter(loader)


class _Iter:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self.loader.__iter__()


def test_an_empty_poisson_batch_takes_its_noisy_step(tmp_path):
    cfg = _cfg(tmp_path)
    data = shard_of(cfg, load_dataset(cfg))[0].subset(range(40))
    model = build_model(10, 4, seed=1, norm="group")
    hook = _Watched(noise_multiplier=1.0, max_grad_norm=1.0, sample_seed=7, noise_seed=8)  # q = 1/40
    result = train(model, data, seeds=[1, 2], batch_size=1, objective=build_objective("cross-entropy",
                   ObjectiveContext(10)), optimizer=OptimizerSpec(lr=0.1, name="sgd").build(model), privacy=hook)
    empty = [i for i, n in enumerate(hook.batches) if n == 0]
    assert len(hook.batches) == 80 and len(empty) >= 10  # int(1/q) batches an epoch, many empty
    assert len(hook.stepped) == len(hook.batches) == result.steps  # a step for every batch drawn...
    assert int(hook.spent()["steps"]) == result.steps  # ...and as many accounted
    assert all(hook.stepped[i] for i in empty)  # an empty batch's step adds the noise
    assert result.loss == result.loss  # the empty batches' nan losses are not averaged in


# ---------------------------------------------------------------------- verification
def test_the_server_reports_a_dp_shard_site_only_and_the_simulated_sites_replay_it(tmp_path, grid_for, capsys):
    from server.experiment import run_training

    cfg = _cfg(tmp_path, **{"num-shards": 1, "slices": 1})
    run_training(grid_for(cfg), cfg)
    capsys.readouterr()
    assert cli.main(["verify", "--run", str(cfg.out_path)]) == 0  # not a failure...
    out = capsys.readouterr().out
    record = json.loads((cfg.out_path / "verify.json").read_text())["shards"]["0"]
    assert record["status"] == "site-only" and record["replay_hash"] is None  # ...and not a proof
    assert "DP randomness is the site's secret" in out and "--site-local" in out and "match" not in out.split(
        "verified:")[0]
    assert cli.main(["verify", "--run", str(cfg.out_path), "--site-local"]) == 0
    out = capsys.readouterr().out
    record = json.loads((cfg.out_path / "verify.json").read_text())["shards"]["0"]
    assert record["status"] == "match" and record["replay_hash"] == record["served_hash"]
    assert "does not hold against the server here" in out  # simulation: the sites' secrets sit beside it
    # the recorded seeds are what the replay rests on: other seeds are a mismatch
    seeds_path = cfg.out_path / "nodes" / "shard-0" / DP_SEEDS_FILE
    record = json.loads(seeds_path.read_text())
    record["stages"]["1"]["noise_seed"] += 1
    seeds_path.write_text(json.dumps(record))
    assert cli.main(["verify", "--run", str(cfg.out_path), "--site-local"]) == cli.EXIT_RUN
    assert "is not the replay" in capsys.readouterr().out


def test_a_site_verifies_its_own_dp_shard_from_its_state_folder_and_data(tmp_path, capsys):
    data, state = tmp_path / "site", tmp_path / "state"
    lines = ["id,path,label"]
    for i in range(40):
        write_png(data / f"img/{i}.png", CLASS_RGB[i % 2])
        lines.append(f"P-{i:04d},img/{i}.png,{i % 2}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, dataset="image-folder", **{"data-root": "", "slices": 2, "batch-size": 8})
    node = _node(cfg, **{keys.NODE_DATA_ROOT: str(data), keys.NODE_STATE_DIR: str(state), keys.NODE_SITE: "site-a"})
    node.sisa.train_through()
    exact.unlearn(node.sisa, [node.sisa.index["slices"][1][0]])  # a deletion: stage 2 retrained
    config = tmp_path / "run.toml"
    config.write_text(cfg.to_toml())
    before = _files(state)
    args = ["verify", "--state-dir", str(state), "--data-root", str(data), "--config", str(config)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "shard 0: match" in out and "replayed at the site with its recorded DP seeds" in out
    assert "never left this site" in out
    assert _files(state) == before  # a verification writes nothing
    # a seed file that is not the one the shard was trained with: a mismatch, not a match
    record = json.loads((state / DP_SEEDS_FILE).read_text())
    record["stages"]["2"]["sample_seed"] += 1
    (state / DP_SEEDS_FILE).write_text(json.dumps(record))
    assert cli.main(args) == cli.EXIT_RUN
    assert "mismatch" in capsys.readouterr().out
    # bad input is one line
    assert cli.main(["verify", "--state-dir", str(state), "--config", str(config)]) == cli.EXIT_USAGE
    assert "needs --data-root" in capsys.readouterr().err
    assert cli.main(["verify", "--state-dir", str(tmp_path / "none"), "--data-root", str(data)]) == cli.EXIT_USAGE
    assert "is not a folder" in capsys.readouterr().err
