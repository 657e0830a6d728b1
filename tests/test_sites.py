"""Hospital sites without a network: two sites with their own image folders (colliding record ids and
row numbers), a server with no data-root, through the real ClientApp handlers. The deployment engine
itself (TLS, SuperNode authentication, killed nodes) is exercised by tests/test_e2e_sites.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fairforget import keys
from fairforget.binding import Binding, BindingError, binding_toml
from fairforget.ledger import Ledger
from fairforget.run import RunDir
from server.experiment import run_training
from server.forget import ForgetError, run_forget
from server.grid import site_grid
from strategies.base import StrategyReplyError
from tests.conftest import TINY, InProcessGrid, forget_request
from tests.fixtures_formats import CLASS_RGB, write_png


def write_site(root: Path, n: int = 40) -> Path:
    """A site's folder: ``labels.csv`` with record ids P-0000.. (the same at every site) and PNGs."""
    rows = ["id,path,label,private"]
    for i in range(n):
        label, private = i % 2, (i // 2) % 2 if i % 10 else 1 - i % 2  # a few bias-conflicting rows
        write_png(root / f"img/{i}.png", CLASS_RGB[label] if private == label else CLASS_RGB[2])
        rows.append(f"P-{i:04d},img/{i}.png,{label},{private}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


class SitesGrid(InProcessGrid):
    """The in-process grid with each node configured as a site: its own data-root, state-dir, name."""

    def __init__(self, cfg, sites: dict[int, tuple[Path, Path, str]], claims: dict[int, int] | None = None) -> None:
        super().__init__(cfg)
        self.sites = sites
        self.nodes = {101 + k: k for k in sites} | (claims or {})
        self.fail: set[int] = set()

    def node(self, node_id: int, assigned: int | None = None):
        from clients.node import Node

        if node_id in self.fail:
            raise RuntimeError(f"site of node {node_id} is down")
        shard = self.nodes[node_id]
        data, state, name = self.sites[shard]
        return Node.from_context(self.cfg.to_mapping(), {
            keys.NODE_PARTITION_ID: shard, keys.NODE_SITE: name,
            keys.NODE_DATA_ROOT: str(data), keys.NODE_STATE_DIR: str(state)}, assigned)


@pytest.fixture
def federation(tmp_path):
    sites = {k: (write_site(tmp_path / f"data-{name}"), tmp_path / f"state-{name}", f"site-{name}")
             for k, name in enumerate("ab")}
    binding = tmp_path / "binding.toml"  # the operator's: site-a's node is 101, site-b's 102
    binding.write_text(binding_toml([(name, k, 101 + k) for k, (_, _, name) in sites.items()]))
    cfg = __import__("fairforget.config", fromlist=["resolve"]).resolve({
        **TINY, "dataset": "image-folder", "data-root": "", "out-dir": str(tmp_path / "server"),
        "audit-attacks": "loss,confidence", "reply-timeout": 5.0, "binding": str(binding)})
    return cfg, sites


def _state_bytes(state: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state)): p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_a_server_without_data_trains_evaluates_and_deletes_at_one_site(federation):
    cfg, sites = federation
    assert not cfg.server_has_data
    run_training(SitesGrid(cfg, sites), cfg)
    run = RunDir(cfg.out_path)
    m = run.metrics()
    assert m["federation"]["binding"] == {"0": {"node": 101, "site": "site-a"}, "1": {"node": 102, "site": "site-b"}}
    assert m["federation"]["missing"] == [] and m["ensemble"]["unbiased"]["n"] > 0
    assert all(0.0 <= s["accuracy_unbiased"] <= 1.0 for s in m["shards"])  # each site's own model, at the site
    assert m["privacy"]["sites"]  # the audits ran at the sites
    assert json.loads((run.path / "nodes.json").read_text())["shards"]["1"]["site"] == "site-b"

    # the same record id at both sites: the request names site-b, so site-a is never asked
    site_a = _state_bytes(sites[0][1])
    grid = SitesGrid(cfg, sites)
    run_forget(grid, cfg, forget_request(site="site-b", records="P-0007"))
    asked = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type in (keys.MSG_DESCRIBE,
                                                                                     keys.MSG_UNLEARN)}
    assert asked == {102}  # no membership question to site-a
    assert _state_bytes(sites[0][1]) == site_a  # byte-identical at the other site
    (line,) = Ledger(run.path / "ledger.jsonl").entries()
    assert (line["site"], line["records"], line["shard"]) == ("site-b", ["P-0007"], 1)
    index = json.loads((sites[1][1] / "index.json").read_text())
    assert line["ids"] == index["deleted"] and len(index["deleted"]) == 1

    # the erasure request repeated is satisfied by the first one (its request and receipt), not an error
    again = run_forget(SitesGrid(cfg, sites), cfg, forget_request(site="site-b", records="P-0007"))
    assert [(r["request"], r["hash_after"], r["site"]) for r in again["satisfied"]] == [
        (line["request"], line["hash_after"], "site-b")]
    with pytest.raises(ForgetError, match="unknown record id.*P-9999"):
        run_forget(SitesGrid(cfg, sites), cfg, forget_request(site="site-a", records="P-9999"))
    with pytest.raises(BindingError, match="site 'site-c'"):
        run_forget(SitesGrid(cfg, sites), cfg, forget_request(site="site-c", records="P-0001"))
    assert len(Ledger(run.path / "ledger.jsonl").entries()) == 1  # refused requests changed nothing

    # what left the sites: statistics and models, never samples, ids or per-group counts
    for entry in (json.loads(x) for x in (run.path / "wire.jsonl").read_text().splitlines()):
        for record in entry.get("records", {}).values():
            names = set(record.get("entries", {}))
            assert not names & {"group-counts", "retired-ids"}, entry
            if entry["message_type"] != keys.MSG_DESCRIBE:
                assert not names & {keys.OWNED_IDS, keys.DELETED_IDS, keys.UNKNOWN_RECORDS}, entry


def test_a_node_the_binding_file_does_not_name_is_never_contacted(federation):
    """A third connected node whose config claims shard 1 (site-b's): the operator's binding file
    decides, so it receives nothing (tests/adversarial/test_binding.py: the attacks)."""
    cfg, sites = federation
    grid = SitesGrid(cfg, sites, claims={103: 1})
    run_training(grid, cfg)
    assert {m.metadata.dst_node_id for m in grid.sent} == {101, 102}
    assert Binding.load(cfg.out_path / "nodes.json", 2).node_of == {0: 101, 1: 102}


@pytest.mark.parametrize("min_shards", [0, 1])
def test_a_lost_site_stops_the_run_or_is_reported(federation, min_shards):
    cfg, sites = federation
    cfg = cfg.replace(min_shards=min_shards, audit=False)
    grid = SitesGrid(cfg, sites)
    original = grid.HANDLERS[keys.MSG_TRAIN]

    def train_fails_at_b(content, node):
        if node.site == "site-b":
            raise RuntimeError("site-b lost its disk")
        return original(content, node)

    grid.HANDLERS = {**grid.HANDLERS, keys.MSG_TRAIN: train_fails_at_b}
    if min_shards == 0:
        with pytest.raises(StrategyReplyError, match=r"1 of 2 shards replied \(shard\(s\) 1 lost"):
            run_training(grid, cfg)
        return
    grid.fail = set()
    run_training(grid, cfg)
    m = RunDir(cfg.out_path).metrics()
    assert m["federation"]["missing"] == [1] and m["federation"]["min_shards"] == 1
    assert sorted(p.name for p in RunDir(cfg.out_path).models_dir.iterdir()) == ["shard-0.pt"]


# ---------------------------------------------------------------------- reply timeout
class SlowGrid(InProcessGrid):
    """Node k's reply becomes available ``delays[k]`` seconds after the push (None: never); its
    ``query.identify`` reply at once."""

    def __init__(self, cfg, delays: dict[int, float | None]) -> None:
        super().__init__(cfg)
        self.delays, self.due = delays, {}

    def push_messages(self, messages):
        ids = []
        for n, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}-{len(self.due)}-{n}"
            identify = msg.metadata.message_type == keys.MSG_IDENTIFY
            task = {keys.NUM_CLASSES: 2, keys.NUM_PRIVATE: 2} if identify else {}
            reply = Message(RecordDict({keys.METRICS: MetricRecord(task)}), reply_to=msg)
            self.outbox[msg.metadata.message_id] = reply
            delay = 0.0 if identify else self.delays[msg.metadata.dst_node_id]
            self.due[msg.metadata.message_id] = None if delay is None else time.monotonic() + delay
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        ready = [i for i in message_ids if self.due.get(i) is not None and self.due[i] <= now]
        return [self.outbox.pop(i) for i in ready]


def test_the_reply_timeout_counts_from_the_last_reply_not_from_the_push(tiny_cfg):
    """Replies that come one after another (a simulation runs a few ClientApps at a time) are all
    waited for although together they take longer than ``reply-timeout``; a node that never answers
    is given up ``reply-timeout`` after the last reply."""
    cfg = tiny_cfg(**{"reply-timeout": 0.6, "num-shards": 4})
    ping = lambda n: Message(RecordDict({}), dst_node_id=n, message_type=keys.MSG_EVALUATE)  # noqa: E731
    grid = site_grid(SlowGrid(cfg, {101: 0.2, 102: 0.6, 103: 1.0, 104: 1.4}), cfg)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive([ping(n) for n in (101, 102, 103, 104)]))
    assert sorted(r.metadata.src_node_id for r in replies) == [101, 102, 103, 104]
    assert time.monotonic() - t0 < 10  # not left waiting once all have answered
    grid = site_grid(SlowGrid(cfg, {101: 0.2, 102: 0.9, 103: None, 104: 0.4}), cfg)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive([ping(n) for n in (101, 102, 103, 104)]))
    assert sorted(r.metadata.src_node_id for r in replies) == [101, 102, 104]
    assert 1.4 <= time.monotonic() - t0 < 10  # 0.9 s to the last reply, then 0.6 s of silence


def test_augmentation_with_a_shard_missing_is_an_error_not_a_quietly_smaller_run(tiny_cfg):
    from flwr.app import ArrayRecord

    from strategies.shard_ensemble import ShardEnsemble

    reports = lambda: {k: {keys.NUM_EXAMPLES: 50, keys.NODE_ID: 101 + k} for k in (0, 1)}  # noqa: E731
    strategy = ShardEnsemble.from_config(tiny_cfg(), 10)
    strategy.shard_reports = reports()
    messages = strategy.configure_augment(0, 0, ArrayRecord())
    report = {"retired_ids": [], "num_originals": 50}
    metrics = MetricRecord({keys.SHARD: 0, keys.NUM_EXAMPLES: 50})
    reply = Message(RecordDict({keys.METRICS: metrics, keys.ARRAYS: ArrayRecord(),
                                keys.CONFIG: ConfigRecord({keys.AUGMENT_JSON: json.dumps(report)})}),
                    reply_to=messages[0])
    with pytest.raises(StrategyReplyError, match=r"augmentation: 1 of 2 shards replied \(shard\(s\) 1 lost: no reply"):
        strategy.aggregate_augment([reply])
    lenient = ShardEnsemble.from_config(tiny_cfg(**{"min-shards": 1}), 10)
    lenient.shard_reports = reports()
    lenient.configure_augment(0, 0, ArrayRecord())
    assert list(lenient.aggregate_augment([reply])) == [0]
