"""Shard ownership, attacked: who may serve a shard is the operator's binding of the shard to the node
id Flower derived from the site's registered key (deployment), or the server's assignment of shards to
the node ids it sees (simulation); never what a node says about itself. An authenticated node of
site C claiming site-a's ``partition-id`` and name, a node replying as another shard, a replayed or
duplicated reply, a reply from an unbound node: each refused with one line, nothing stored.

In process (tests/conftest.py's grid delivers the messages to the real ClientApp handlers); the same
attack on the real deployment engine (TLS, SuperNode authentication, a third registered key) is
tests/test_e2e_sites.py's ``test_a_registered_node_claiming_site_a_gets_nothing``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo

from clients.node import Node, assigned_shard
from fairforget import keys
from fairforget.binding import Binding, BindingError, binding_toml
from fairforget.config import resolve
from fairforget.data import load_dataset, shard_of
from fairforget.ledger import Ledger
from fairforget.run import RunDir
from server.experiment import run_training
from server.forget import run_forget
from server.grid import site_grid
from strategies.base import StrategyReplyError
from tests.conftest import TINY, InProcessGrid, forget_request
from tests.test_sites import write_site

SITES = {0: "site-a", 1: "site-b"}
A, B, C = 101, 102, 103  # node ids: site-a's, site-b's, and site-c's (whose config claims site-a's shard)


class Sites(InProcessGrid):
    """Nodes with their own node config (``configs``: node id -> config); ``online``: the connected
    ones; ``tamper``: node id -> a function of (message, honest reply) giving the replies that node
    sends instead (a modified ClientApp)."""

    def __init__(self, cfg, configs: dict[int, dict], names: dict[int, str] | None = None) -> None:
        super().__init__(cfg)
        self.configs, self.names = configs, names or {}
        self.nodes = {n: c.get(keys.NODE_PARTITION_ID) for n, c in configs.items()}
        self.online = set(configs)
        self.tamper: dict[int, object] = {}

    def get_node_ids(self):
        return sorted(self.online)

    def get_nodes(self):
        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in sorted(self.online)]

    def node(self, node_id: int, assigned: int | None = None) -> Node:
        return Node.from_context(self.cfg.to_mapping(), self.configs[node_id], assigned)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            assert msg.metadata.dst_node_id in self.online, f"sent to node {msg.metadata.dst_node_id}, offline"
            ids += super().push_messages([msg])
            forge = self.tamper.get(msg.metadata.dst_node_id)
            if forge is not None:
                self.outbox[ids[-1]] = forge(msg, self.outbox[ids[-1]])
        return ids

    def pull_messages(self, message_ids):
        out = []
        for i in list(message_ids):
            got = self.outbox.pop(i, None)
            out += got if isinstance(got, list) else [got] if got is not None else []
        return out

    def received(self, node_id: int) -> list[str]:
        return [m.metadata.message_type for m in self.sent if m.metadata.dst_node_id == node_id]


def site_config(root: Path, name: str, partition: int) -> dict:
    return {keys.NODE_PARTITION_ID: partition, keys.NODE_SITE: name,
            keys.NODE_DATA_ROOT: str(root / f"data-{name}"), keys.NODE_STATE_DIR: str(root / f"state-{name}")}


@pytest.fixture
def hospitals(tmp_path):
    """site-a (node 101, shard 0) and site-b (node 102, shard 1), bound by the operator's file; site-c's
    node 103 is authenticated (it is in the federation) but its config claims partition-id 0, site-a."""
    for name in ("site-a", "site-b", "site-c"):
        write_site(tmp_path / f"data-{name}")
    binding = tmp_path / "binding.toml"
    binding.write_text(binding_toml([("site-a", 0, A), ("site-b", 1, B)]))
    cfg = resolve({**TINY, "dataset": "image-folder", "data-root": "", "out-dir": str(tmp_path / "server"),
                   "audit": False, "reply-timeout": 1.0, "binding": str(binding)})
    configs = {A: site_config(tmp_path, "site-a", 0), B: site_config(tmp_path, "site-b", 1),
               C: {**site_config(tmp_path, "site-c", 0), keys.NODE_SITE: "site-a"}}
    return cfg, configs, tmp_path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")} if folder.exists() else {}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------- a node claiming another site's shard
def test_a_node_claiming_site_as_shard_gets_nothing_even_while_site_a_is_offline(hospitals):
    cfg, configs, root = hospitals
    grid = Sites(cfg, configs)
    run_training(grid, cfg)
    assert grid.received(C) == []  # connected and claiming shard 0 as site-a: never sent anything
    assert Binding.load(cfg.out_path / "nodes.json", 2).node_of == {0: A, 1: B}
    assert files(root / "state-site-c") == {}

    # site-a goes offline; site-c's node is still there, claiming its shard: a deletion at site-a is
    # not sent to it, and the run stops with one line naming site-a's node
    run = RunDir(cfg.out_path)
    before = {p: files(p) for p in (cfg.out_path / "models", root / "state-site-a", root / "state-site-b")}
    nodes_json, ledger = (cfg.out_path / "nodes.json").read_bytes(), Ledger(run.path / "ledger.jsonl").entries()
    grid = Sites(cfg, configs)
    grid.online.discard(A)
    with pytest.raises(BindingError) as err:
        run_forget(grid, cfg, forget_request(site="site-a", records="P-0003"))
    assert f"node {A}" in one_line(err) and "never connected" in str(err.value) and str(cfg.binding) in str(err.value)
    assert grid.received(C) == [] and grid.received(B) == [keys.MSG_IDENTIFY]  # who is there: site-b only
    assert {p: files(p) for p in before} == before and files(root / "state-site-c") == {}
    assert (cfg.out_path / "nodes.json").read_bytes() == nodes_json
    assert Ledger(run.path / "ledger.jsonl").entries() == ledger
    assert not (root / "data-site-c" / ".fairforget-tombstones.jsonl").exists()

    # a new training with site-a offline and min-shards = 1: site-c's node is still not bound
    fresh = cfg.replace(out_dir=str(root / "server-2"), min_shards=1)
    grid = Sites(fresh, configs)
    grid.online.discard(A)
    run_training(grid, fresh)
    assert grid.received(C) == [] and {m.metadata.dst_node_id for m in grid.sent} == {B}
    assert sorted(p.name for p in RunDir(fresh.out_path).models_dir.iterdir()) == ["shard-1.pt"]
    assert RunDir(fresh.out_path).metrics()["federation"]["missing"] == [0]


@pytest.mark.parametrize("case", ["file-binds-it-elsewhere", "partition-id-disagrees", "name-disagrees",
                                  "registered-name-disagrees", "replies-as-shard-0"])
def test_an_identity_that_disagrees_with_the_binding_file_is_refused_and_nothing_stored(hospitals, case):
    cfg, configs, root = hospitals
    names = {}
    if case == "file-binds-it-elsewhere":  # the operator bound site-c's node (which claims site-a) as site-b
        Path(cfg.binding).write_text(binding_toml([("site-a", 0, A), ("site-b", 1, C)]))
        expect = f"node {C} failed to identify: ValueError: site 'site-a': the server assigned shard 1, but this " \
                 "node's partition-id is 0"
    elif case == "partition-id-disagrees":  # site-b's node config says shard 0: the site refuses shard 1
        configs[B][keys.NODE_PARTITION_ID] = 0
        expect = f"node {B} failed to identify: ValueError: site 'site-b': the server assigned shard 1, but"
    elif case == "name-disagrees":  # site-b's node calls itself site-a
        configs[B][keys.NODE_SITE] = "site-a"
        expect = f"binds node {B} to shard 1 as site 'site-b', but the node says partition-id = 1, site = 'site-a'"
    elif case == "registered-name-disagrees":  # the key of node 102 was registered as site-c
        names = {A: "site-a", B: "site-c"}
        expect = "registered as 'site-c'"
    else:
        expect = f"node {B} is bound to shard 1 but replied as shard 0"
    grid = Sites(cfg, configs, names)
    if case == "replies-as-shard-0":  # a modified ClientApp at site-b answers as site-a's shard 0

        def as_site_a(msg, reply):
            forged = Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SITE: "site-a"}), keys.METRICS: MetricRecord(
                {**dict(reply.content[keys.METRICS]), keys.SHARD: 0, keys.NODE_PARTITION_ID: 0})}), reply_to=msg)
            return [forged]

        grid.tamper[B] = as_site_a
    with pytest.raises(BindingError) as err:
        run_training(grid, cfg)
    assert expect in one_line(err), str(err.value)
    assert not any(m.metadata.message_type != keys.MSG_IDENTIFY for m in grid.sent)  # nothing but identify
    assert grid.received(C) == ([keys.MSG_IDENTIFY] if case == "file-binds-it-elsewhere" else [])
    out = cfg.out_path
    assert not (out / "nodes.json").exists() and not (out / "models").exists() and not (out / "metrics.json").exists()
    assert all(files(root / f"state-{s}") == {} for s in ("site-a", "site-b", "site-c"))
    if case == "replies-as-shard-0":  # the wire log names the refusal
        (line,) = [json.loads(x) for x in (out / "wire.jsonl").read_text().splitlines() if "refused" in x]
        assert line["src_node_id"] == B and "replied as shard 0" in line["refused"]


# ---------------------------------------------------------------------- bad binding files: one line naming the file
BAD = {
    "missing": (None, "not found"),
    "not-toml": ("[[site]\nname = ", "not valid TOML"),
    "no-sites": ('title = "x"\n', "one [[site]] table per site"),
    "missing-key": ('[[site]]\nname = "site-a"\nshard = 0\n', "missing key(s) node-id"),
    "unknown-key": ('[[site]]\nname = "site-a"\nshard = 0\nnode-id = 101\npartition-id = 0\n', "unknown key(s)"),
    "shard-out-of-range": (binding_toml([("site-a", 0, A), ("site-b", 2, B)]), "shard = 2 is out of range"),
    "shard-not-int": ('[[site]]\nname = "site-a"\nshard = "0"\nnode-id = 101\n', "shard = '0' must be an integer"),
    "bad-node-id": (binding_toml([("site-a", 0, -5)]), "node-id = -5 must be the positive integer"),
    "two-nodes-one-shard": (binding_toml([("site-a", 0, A), ("site-b", 0, B)]), "two nodes for shard 0"),
    "one-node-two-shards": (binding_toml([("site-a", 0, A), ("site-b", 1, A)]), f"node {A} is bound to two shards"),
    "site-twice": (binding_toml([("site-a", 0, A), ("site-a", 1, B)]), "site 'site-a' is listed twice"),
    "empty-name": (binding_toml([("", 0, A)]), "must be the site's name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_binding_file_is_one_line_naming_it_and_nothing_is_stored(hospitals, case):
    cfg, configs, root = hospitals
    text, expect = BAD[case]
    path = Path(cfg.binding)
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    grid = Sites(cfg, configs)
    with pytest.raises(BindingError) as err:
        run_training(grid, cfg)
    assert one_line(err).startswith(f"binding file {path}") and expect in str(err.value), str(err.value)
    assert grid.sent == [] and not (cfg.out_path / "nodes.json").exists() and not (cfg.out_path / "models").exists()


def test_a_bound_node_that_never_connects_and_a_missing_binding_file(hospitals):
    cfg, configs, root = hospitals
    Path(cfg.binding).write_text(binding_toml([("site-a", 0, A), ("site-b", 1, 999)]))  # a wrong node-id for B
    grid = Sites(cfg, configs)
    with pytest.raises(BindingError) as err:
        run_training(grid, cfg)
    assert "node 999" in one_line(err) and "never connected within reply-timeout = 1s" in str(err.value)
    assert str(cfg.binding) in str(err.value) and grid.received(B) == [] and grid.received(C) == []
    # the sites keep their own data: the server will not guess who is who
    with pytest.raises(BindingError) as err:
        site_grid(Sites(cfg, configs), cfg.replace(binding=""))
    assert "config key 'binding' is empty" in one_line(err)


def test_a_deletion_naming_an_unbound_site_names_the_binding_file(hospitals):
    cfg, configs, _ = hospitals
    b = Binding.read(cfg.binding, 2)
    with pytest.raises(BindingError) as err:
        b.shard_of_site("site-c")
    assert one_line(err) == f"site 'site-c' is not bound in binding file {cfg.binding} (sites: site-a, site-b)"
    with pytest.raises(BindingError, match="no binding file"):
        Binding(2).shard_of_site("site-a")


# ---------------------------------------------------------------------- replies: replayed, duplicated, unbound
class Replaying(InProcessGrid):
    """Simulation (no binding file: the server assigns shards). ``extra(msg, reply)`` gives the replies
    pulled for ``msg``, the honest one included where it should arrive."""

    extra = None

    def pull_messages(self, message_ids):
        out = []
        for i in list(message_ids):
            reply = self.outbox.pop(i, None)
            if reply is not None:
                out += self.extra(self.by_id[i], reply) if self.extra else [reply]
        return out

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        self.by_id = {**getattr(self, "by_id", {}), **{m.metadata.message_id: m for m in self.sent[-len(ids):]}}
        return ids


def _refusals(cfg) -> list[dict]:
    lines = [json.loads(x) for x in (cfg.out_path / "wire.jsonl").read_text().splitlines()]
    return [x for x in lines if "refused" in x]


def test_duplicated_replayed_and_forged_replies_are_refused_and_not_stored(tiny_cfg):
    """Simulation, two shards, a third (unbound) node 103. At stage 1 node 101's reply arrives twice,
    and with it a copy sent by node 103 and one answering a message nobody sent; at stage 2 each node's
    stage-1 reply comes back first (a replay), then the real one."""
    cfg = tiny_cfg(**{"audit": False, "reply-timeout": 1.0})
    grid = Replaying(cfg)
    grid.nodes[103] = 0  # its config claims shard 0; the server assigns it nothing
    stale: dict[int, Message] = {}

    def attack(msg, reply):
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        if kind != keys.MSG_TRAIN:
            return [reply]
        if int(msg.content[keys.CONFIG][keys.STAGE]) == 2:
            return [stale[node], reply]  # the stage-1 model again (a replay), then the real one
        stale[node] = reply
        if node != 101:
            return [reply]
        from_103 = Message(RecordDict(dict(reply.content.items())), reply_to=msg)
        from_103.metadata.__dict__["_src_node_id"] = 103  # node 103 answers the message sent to 101
        unsent = Message(RecordDict(dict(reply.content.items())), reply_to=msg)
        unsent.metadata.__dict__["_reply_to_message_id"] = "f" * 64  # a message nobody sent
        return [from_103, unsent, reply, reply]  # and the real reply twice

    grid.extra = attack
    run_training(grid, cfg)
    assert {m.metadata.dst_node_id for m in grid.sent} == {101, 102}  # nothing to the unbound node
    assert Binding.load(cfg.out_path / "nodes.json", 2).node_of == {0: 101, 1: 102}
    refused = sorted((x["src_node_id"], x["refused"].split(" to message")[0]) for x in _refusals(cfg))
    assert refused == [(101, "a replayed reply"), (101, "a reply"), (101, "a second reply"), (102, "a replayed reply"),
                       (103, "node 103 answered a train sent to node 101 (node 103 is bound to no shard)")], refused
    # what was stored is each shard's stage-2 model from its node, never the replayed stage-1 one
    run = RunDir(cfg.out_path)
    for node_id, shard in ((101, 0), (102, 1)):
        node = grid.node(node_id)
        served, latest = run.load_models()[shard], node.sisa.model_state(2)
        assert all((served[k] == latest[k]).all() for k in latest)
        assert any((served[k] != node.sisa.model_state(1)[k]).any() for k in latest)


def test_a_lost_reply_replaced_by_a_replay_stops_the_run_with_nothing_stored(tiny_cfg):
    cfg = tiny_cfg(**{"audit": False, "reply-timeout": 0.5})
    grid = Replaying(cfg)
    stale = {}

    def withhold(msg, reply):
        if msg.metadata.message_type != keys.MSG_TRAIN or msg.metadata.dst_node_id != 102:
            return [reply]
        if int(msg.content[keys.CONFIG][keys.STAGE]) == 1:
            stale["r"] = reply
            return [reply]
        return [stale["r"]]  # node 102's real stage-2 reply is lost; its stage-1 reply comes back instead

    grid.extra = withhold
    with pytest.raises(StrategyReplyError, match=r"1 of 2 shards replied") as err:
        run_training(grid, cfg)
    one_line(err)
    assert not RunDir(cfg.out_path).models_dir.exists() or not any(RunDir(cfg.out_path).models_dir.iterdir())


# ---------------------------------------------------------------------- simulation: the server assigns
def test_in_simulation_the_server_assigns_shards_and_a_lying_partition_id_changes_nothing(tiny_cfg):
    cfg = tiny_cfg(**{"audit": False})
    grid = InProcessGrid(cfg)
    grid.nodes = {101: 1, 102: 1}  # both nodes' configs say partition 1
    run_training(grid, cfg)
    # the server assigned sorted node ids to shards 0, 1, and every message said so
    assert {(m.metadata.dst_node_id, m.content[keys.CONFIG][keys.SHARD]) for m in grid.sent} == {(101, 0), (102, 1)}
    run = RunDir(cfg.out_path)
    assert Binding.load(run.path / "nodes.json", 2).node_of == {0: 101, 1: 102}
    parts = shard_of(cfg, load_dataset(cfg))
    for shard in (0, 1):  # each shard was trained on its own partition, in its own state folder
        node = Node.from_context(cfg.to_mapping(), {keys.NODE_PARTITION_ID: 1}, shard)
        assert node.state_dir == run.path / "nodes" / f"shard-{shard}"
        assert set(node.sisa.live_ids()) == set(parts[shard].ids.tolist())
        served, state = run.load_models()[shard], node.sisa.model_state()
        assert all((served[k] == state[k]).all() for k in state)
    # a deletion goes to the node the server assigned the owning shard, whatever the node claims
    victim = int(parts[0].ids[0])
    grid = InProcessGrid(cfg)
    grid.nodes = {101: 1, 102: 1}
    run_forget(grid, cfg, forget_request(str(victim)))
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == keys.MSG_UNLEARN} == {101}
    (line,) = [e for e in Ledger(run.path / "ledger.jsonl").entries() if e.get("phase", "done") == "done"]
    assert (line["shard"], line["ids"]) == (0, [victim])


def test_the_clientapp_serves_only_the_shard_a_message_assigns(hospitals, tiny_cfg):
    cfg, configs, _ = hospitals
    msg = Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=A, message_type=keys.MSG_IDENTIFY)
    with pytest.raises(ValueError, match="carries no assigned shard"):
        assigned_shard(msg.content)
    with pytest.raises(ValueError, match=r"site 'site-a': the server assigned shard 1, but this node's partition-id"):
        Node.from_context(cfg.to_mapping(), configs[A], 1)  # a site with its own data: only its own shard
    sim = tiny_cfg()
    with pytest.raises(ValueError, match=r"assigned shard 5, but the run has shards 0..1"):
        Node.from_context(sim.to_mapping(), {keys.NODE_PARTITION_ID: 0}, 5)
    assert Node.from_context(sim.to_mapping(), {keys.NODE_PARTITION_ID: 0}, 1).shard == 1
