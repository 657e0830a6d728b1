"""Deletion that cannot stick half-done (issue 21, part 5), tested as the failures it must survive:

* a deletion the DP hard stop refuses mid-way (the retrain after the removal would pass
  ``dp-max-epsilon``): refused with a true message, state folder and tombstones byte-identical, the
  node still serving;
* a real SIGKILL at each point of an approximate deletion: after restart the shard serves the exact
  retrain (checked against a from-scratch training on an independent slice list) or the approximate
  model, never the model before the deletion, and no file in the state folder holds that model;
* a short write (then a refused one) while the tombstone is appended: the whole line, durable before
  the shard changes, or a one-line error and nothing deleted;
* a ``labels.csv`` row added between training and a forget: no record changes split, the forget works;
* tombstones keyed on the normalised record id, beside the data: ``./img/1.png`` deleted is
  ``img/1.png`` too, under a new site key too, and a simulation over the folder with a new out-dir
  honours them.

Everything runs through the real ClientApp handlers on tiny configurations."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from clients import handlers
from clients.node import Node
from fairforget import keys
from fairforget.config import resolve
from fairforget.data import _load_cached, load_dataset, shard_of
from fairforget.privacy.accountant import PrivacyBudgetExceeded
from fairforget.sisa import SisaError, SisaSettings, SisaShard, assign_slices
from fairforget.storage import read_jsonl, state_hash, sweep_leftovers, torch_load
from fairforget.tombstones import SITE_FILE, Tombstones, legacy_sample_id
from fairforget.unlearning import approximate
from tests.conftest import TINY
from tests.fixtures_formats import CLASS_RGB, write_png


# ---------------------------------------------------------------------- helpers
def _node(cfg, shard: int = 0, **node_config) -> Node:
    """The node serving ``shard`` of ``cfg`` (a simulation node unless ``node_config`` says data-root)."""
    conf = {keys.NODE_PARTITION_ID: shard, keys.NODE_NUM_PARTITIONS: cfg.num_shards, **node_config}
    return Node.from_context(cfg.to_mapping(), conf)


def _msg(node: Node, ids: list[int] | None = None, method: str | None = None, records: list[str] | None = None):
    config = {keys.SHARD: node.shard, keys.FORGET_IDS: [int(i) for i in ids or []],
              keys.MODEL_TARGET: keys.TARGET_OWN_SHARD}  # an evaluation of the site's own model
    if method:
        config[keys.UNLEARN_METHOD] = method
    if records:
        config[keys.FORGET_RECORDS] = records
    return RecordDict({keys.CONFIG: ConfigRecord(config)})


def _describe(node: Node, ids: list[int]) -> tuple[list[int], list[int]]:
    reply = handlers.describe(_msg(node, ids), node)[keys.CONFIG]
    return [int(i) for i in reply[keys.OWNED_IDS]], [int(i) for i in reply[keys.DELETED_IDS]]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (the lock file names its last holder: left out)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _bytes(path: Path) -> bytes | None:
    return Path(path).read_bytes() if Path(path).exists() else None


def _models_in(folder: Path) -> dict[str, str]:
    """The hash of every model any file under ``folder`` holds (checkpoints, approx.pt, a temporary)."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.suffix not in (".pt", ".tmp"):
            continue
        try:
            blob = torch_load(path)
        except Exception:  # noqa: BLE001 - not a torch file
            continue
        if isinstance(blob, dict) and isinstance(blob.get("model"), dict):
            found[str(path.relative_to(folder))] = state_hash(blob["model"])
    return found


def _scratch_hash(cfg, shard: int, deleted: set[int], tmp: Path) -> str:
    """The shard trained from scratch without ``deleted``, its slices drawn anew from the shard's own
    data (:func:`assign_slices`), not read from any node's index."""
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[shard]
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    slices = [[i for i in sl if i not in deleted]
              for sl in assign_slices(data.ids.tolist(), settings.slices, settings.seed, shard)]
    fresh = SisaShard(tmp, shard, data.select_ids(sorted(set(data.ids.tolist()) - deleted)), settings, slices=slices)
    fresh.train_through()
    return fresh.model_hash()


# ---------------------------------------------------------------------- (a) the DP cap mid-deletion
DP = {"dp": True, "dp-accountant": "rdp", "dp-noise-multiplier": 1.5, "audit": False}


def test_the_dp_cap_reached_mid_deletion_refuses_with_nothing_changed(tmp_path):
    # the cap between what training spends and what training plus the retrain after the removal would
    probe = _node(resolve({**TINY, **DP, "out-dir": str(tmp_path / "probe"), "dp-max-epsilon": 1e6}))
    shard = probe.sisa
    victim = sorted(shard.index["slices"][0])[0]  # in the first slice: the retrain goes through every stage
    stages = list(range(1, shard.settings.slices + 1))
    train = shard.planned(stages)
    retrain = shard.planned(stages, [[i for i in sl if i != victim] for sl in shard.index["slices"]])
    spent, after = shard.accountant.epsilon(train), shard.accountant.epsilon(train + retrain)
    cfg = resolve({**TINY, **DP, "out-dir": str(tmp_path / "run"), "dp-max-epsilon": (spent + after) / 2})
    node = _node(cfg)
    node.sisa.train_through()  # within the cap
    state, tomb = _files(node.state_dir), _bytes(node.tombstones.path)
    served = approximate.current_hash(node.sisa)

    for ids, method, error, words in [
        ([victim], "exact-sisa", PrivacyBudgetExceeded, "nothing was trained or changed"),
        ([victim], "neggrad", SisaError, "cannot run under DP-SGD"),
        ([victim, 999_999_999], "exact-sisa", SisaError, "not in shard 0: 999999999"),
    ]:
        node = _node(cfg)  # a new message, a new node object, the same folders
        with pytest.raises(error) as exc:
            handlers.unlearn(_msg(node, ids, method), node)
        message = str(exc.value)
        assert words in message and "\n" not in message
        # the message is true: nothing changed, the id is not tombstoned, the node serves the same model
        assert _files(node.state_dir) == state, f"{method} {ids}: the state folder changed"
        assert _bytes(node.tombstones.path) == tomb, f"{method} {ids}: the tombstones changed"
    node = _node(cfg)
    assert _describe(node, [victim]) == ([victim], [])  # still held, not deleted, the node answers
    assert approximate.current_hash(node.sisa) == served
    evaluation = handlers.evaluate(_msg(node), node)
    assert json.loads(evaluation[keys.CONFIG][keys.EVAL_JSON])["biased"]["n"] > 0
    assert _files(node.state_dir) == state

    # a deletion tombstoned before a crash (an approximate one, whose own spend fitted), whose exact
    # finish on restart is past the cap: the id leaves the index all the same, the node keeps serving
    node.tombstones.add([victim])
    node = _node(cfg)
    assert _describe(node, [victim]) == ([], [victim])
    assert approximate.current_hash(node.sisa) != served and victim in node.sisa.deleted
    assert node.sisa.target > node.sisa.trained  # the retrain stays pending, refused by the cap
    handlers.evaluate(_msg(node), node)


# ---------------------------------------------------------------------- (b) a kill inside an approximate deletion
def _kill_at(point: str, cfg_map: dict, ids: list[int]) -> None:
    """In a child process: an approximate deletion through the handler that SIGKILLs its own process at
    ``point`` (nothing after the kill runs: no ``finally``, no flush, no atexit)."""
    from fairforget import storage

    def die(*_, **__):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "after-tombstone":  # the tombstone is durable, the index not yet committed
        SisaShard.remove = die
    elif point == "after-index-commit":  # the index written, the stale checkpoints not yet removed
        remove = SisaShard.remove

        def killing_remove(self, *a, **k):
            save = self._save_index
            self._save_index = lambda: (save(), die())
            return remove(self, *a, **k)

        SisaShard.remove = killing_remove
    elif point == "before-save":  # the approximate model computed, not saved
        approximate._save = die
    elif point == "mid-save":  # approx.pt's temporary file written and fsynced, not renamed
        replace = os.replace
        storage.os.replace = lambda src, dst: die() if str(dst).endswith("approx.pt") else replace(src, dst)
    elif point == "after-save":
        save = approximate._save
        approximate._save = lambda *a, **k: (save(*a, **k), die())
    node = _node(resolve(cfg_map))
    handlers.unlearn(_msg(node, ids, "finetune"), node)
    os._exit(3)  # not killed: the point was never reached


KILL_POINTS = {"after-tombstone": "exact", "after-index-commit": "exact", "before-save": "exact",
               "mid-save": "exact", "after-save": "approximate"}


@pytest.fixture(scope="module")
def trained_shard(tmp_path_factory):
    """Shard 0 of a tiny run, trained, then one id deleted approximately (so the model before the next
    deletion is an approximate one, in ``approx.pt``); the victims are two more ids of its last slice."""
    root = tmp_path_factory.mktemp("kill")
    cfg = resolve({**TINY, "out-dir": str(root / "base"), "audit": False, "unlearn-epochs": 1})
    node = _node(cfg)
    node.sisa.train_through()
    prior, *victims = sorted(node.sisa.index["slices"][-1])[:3]
    handlers.unlearn(_msg(node, [prior], "finetune"), node)
    assert approximate.meta(node.sisa) is not None
    return cfg, [prior], victims, approximate.current_hash(node.sisa)


def test_a_kill_inside_an_approximate_deletion_never_serves_the_model_before_it(trained_shard, tmp_path):
    cfg, prior, victims, before = trained_shard
    exact = _scratch_hash(cfg, 0, set(prior + victims), tmp_path / "scratch")
    # the approximate model, from the same deletion run to its end without a kill
    done = cfg.replace(out_dir=str(tmp_path / "uninterrupted"))
    shutil.copytree(cfg.out_dir, done.out_dir)
    node = _node(done)
    approx = str(handlers.unlearn(_msg(node, victims, "finetune"), node)[keys.CONFIG][keys.MODEL_HASH])
    assert len({before, exact, approx}) == 3
    assert approximate.current_hash(node.sisa) == approx

    runs = {}
    ctx = multiprocessing.get_context("fork")  # a real process, killed for real; forked: no second import
    for point in KILL_POINTS:  # each in its own copy of the trained run
        run = cfg.replace(out_dir=str(tmp_path / point))
        shutil.copytree(cfg.out_dir, run.out_dir)
        runs[point] = (run, ctx.Process(target=_kill_at, args=(point, run.to_mapping(), victims)))
        runs[point][1].start()
    for point, (run, proc) in runs.items():
        proc.join(timeout=120)
        assert proc.exitcode == -signal.SIGKILL, f"{point}: the child was not killed there ({proc.exitcode})"
        node = _node(run)  # the restarted node: its first message finishes what the kill interrupted
        owned, gone = _describe(node, victims)
        assert owned == [] and gone == victims, point
        served = approximate.current_hash(node.sisa)
        assert served != before, f"{point}: the model before the deletion is served"
        assert served == (exact if KILL_POINTS[point] == "exact" else approx), point
        held = _models_in(node.state_dir)
        assert before not in held.values(), f"{point}: a file still holds the model before the deletion: {held}"
        for path in (node.state_dir / "checkpoints").glob("stage-*.pt"):
            assert not set(victims) & set(torch_load(path)["ids"].tolist()), f"{point}: {path.name} trained on them"
        assert not list(node.state_dir.rglob(".*.tmp")), point
        index = node.sisa.index
        assert set(victims) <= set(index["deleted"]) and not set(victims) & node.sisa.live_ids()
        if KILL_POINTS[point] == "exact":
            assert index["trained"] == cfg.slices and not approximate.approx_path(node.sisa).exists(), point
        else:
            assert approximate.meta(node.sisa)["method"] == "finetune" and index["target"] == cfg.slices
        assert {int(r["id"]) for r in read_jsonl(node.tombstones.path)} == set(prior + victims)


# ---------------------------------------------------------------------- (c) a short write while tombstoning
@pytest.mark.parametrize("then", ["rest", "zero", "enospc"])
def test_a_short_write_while_tombstoning_is_finished_or_fails_loudly(trained_shard, tmp_path, monkeypatch, then):
    base, prior, _, _ = trained_shard
    cfg = base.replace(out_dir=str(tmp_path / "run"))
    shutil.copytree(base.out_dir, cfg.out_dir)  # the tombstone file exists, with a whole line
    node = _node(cfg)
    victim = sorted(node.sisa.index["slices"][-1])[3]
    node = _node(cfg)
    tomb_path = node.tombstones.path
    tomb, state = tomb_path.read_bytes(), _files(node.state_dir)

    events: list[str] = []
    real_write, real_fsync = os.write, os.fsync
    calls = {"n": 0}

    def is_tomb(fd: int) -> bool:
        return os.readlink(f"/proc/self/fd/{fd}") == str(tomb_path.resolve())

    def write(fd, data):
        if not is_tomb(fd):
            return real_write(fd, data)
        calls["n"] += 1
        if calls["n"] == 1:  # half the line
            return real_write(fd, bytes(data[: len(data) // 2]))
        if then == "zero":
            if calls["n"] > 4:
                raise RuntimeError("a write that wrote nothing was retried again and again")
            return 0
        if then == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def fsync(fd):
        if is_tomb(fd):
            events.append("tombstone fsynced")
        return real_fsync(fd)

    remove = SisaShard.remove

    def recording_remove(self, *a, **k):
        events.append("shard changed")
        return remove(self, *a, **k)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(SisaShard, "remove", recording_remove)
    if then == "rest":
        handlers.unlearn(_msg(node, [victim]), node)
        monkeypatch.undo()
        assert calls["n"] >= 2  # the short write was continued
        rows = read_jsonl(tomb_path)  # every line whole
        assert tomb_path.read_bytes().startswith(tomb) and [int(r["id"]) for r in rows] == [*prior, victim]
        assert events.index("tombstone fsynced") < events.index("shard changed")  # durable before the deletion
        assert _describe(_node(cfg), [victim]) == ([], [victim])
        return
    with pytest.raises(OSError) as exc:
        handlers.unlearn(_msg(node, [victim]), node)
    monkeypatch.undo()
    message = str(exc.value)
    assert str(tomb_path) in message and "\n" not in message
    assert "shard changed" not in events  # the deletion was not performed
    assert tomb_path.read_bytes() == tomb  # no half line left
    assert _files(node.state_dir) == state
    node = _node(cfg)
    assert _describe(node, [victim]) == ([victim], [])
    handlers.unlearn(_msg(node, [victim]), node)  # the disk has room again: the retry is served
    assert [int(r["id"]) for r in read_jsonl(tomb_path)] == [*prior, victim]


# ---------------------------------------------------------------------- sites: splits and tombstones
def _write_folder(root: Path, rows: list[tuple[str, str, int]], header: str = "id,path,label") -> Path:
    """``root/labels.csv`` with (record id, path, label) rows (no id column when ``header`` has none)."""
    lines = [header]
    for record, path, label in rows:
        file = root / path
        if not file.exists():
            write_png(file, CLASS_RGB[label])
        lines.append(f"{record},{path},{label}" if header.startswith("id") else f"{path},{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    _load_cached.cache_clear()  # the same data keys, new contents: a restarted node reads them again
    return root


def _site_cfg(tmp_path: Path, **kw):
    return resolve({**TINY, "dataset": "image-folder", "data-root": "", "out-dir": str(tmp_path / "server"),
                    "audit": False, **kw})


def _site(cfg, data: Path, state: Path) -> Node:
    return _node(cfg, **{keys.NODE_DATA_ROOT: str(data), keys.NODE_STATE_DIR: str(state), keys.NODE_SITE: "site-a"})


def _splits(node: Node) -> dict[str, str]:
    b = node.bundle
    return {b.records[int(i)]: name for name, s in (("train", b.train), ("heldout", b.heldout), ("test", b.test_biased))
            for i in s.ids.tolist()}


def test_a_row_added_to_labels_csv_moves_no_record_and_the_forget_works(tmp_path):
    cfg = _site_cfg(tmp_path)
    data, state = tmp_path / "site", tmp_path / "state"
    rows = [(f"P-{i:04d}", f"img/{i}.png", i % 2) for i in range(40)]
    _write_folder(data, rows)
    node = _site(cfg, data, state)
    node.sisa.train_through()
    before = _splits(node)
    members = sorted(r for r, s in before.items() if s == "train")
    # a new patient, on the first row: every other row moves down one
    _write_folder(data, [("P-0040", "img/40.png", 0), *rows])
    node = _site(cfg, data, state)
    after = _splits(node)
    assert {r: after[r] for r in before} == before  # no record changed split
    assert set(after) - set(before) == {"P-0040"}
    found, _ = node.bundle.sample_ids([members[0]])
    reply = handlers.describe(_msg(node, [], records=[members[0]]), node)[keys.CONFIG]
    assert [int(i) for i in reply[keys.OWNED_IDS]] == found and list(reply[keys.UNKNOWN_RECORDS]) == []
    result = handlers.unlearn(_msg(node, found), node)
    assert result[keys.CONFIG][keys.MODEL_HASH] == approximate.current_hash(node.sisa)
    node = _site(cfg, data, state)
    assert found[0] in node.sisa.deleted and found[0] not in set(node.data.ids.tolist())
    handlers.evaluate(_msg(node), node)  # every handler still finds its ids


def test_tombstones_key_on_the_normalised_record_id_and_live_beside_the_data(tmp_path):
    cfg = _site_cfg(tmp_path)
    data = tmp_path / "site"
    rows = [("", f"./img/{i}.png", i % 2) for i in range(30)]
    _write_folder(data, rows, header="path,label")
    node = _site(cfg, data, tmp_path / "state-1")
    assert node.tombstones.path == data / SITE_FILE
    member = next(r for r, s in _splits(node).items() if s == "train")  # "img/N.png", normalised
    old = next(r for r, s in _splits(node).items() if s == "train" and r != member)
    ids, _ = node.bundle.sample_ids([f"./{member}"])  # the site names it as its labels.csv spells it
    assert len(ids) == 1
    handlers.unlearn(_msg(node, ids), node)
    (line,) = read_jsonl(data / SITE_FILE)
    assert line["record"] == member and line["id"] == ids[0]
    # an older version's line: the id alone, its unkeyed hash of the record id
    with (data / SITE_FILE).open("a") as fh:
        fh.write(json.dumps({"id": legacy_sample_id(old), "request": None, "time": "2025-01-01T00:00:00+00:00"}) + "\n")

    # the same images listed as "img/N.png", under a new site key, a new state folder: neither record is trained on
    _write_folder(data, [("", p.removeprefix("./"), y) for _, p, y in rows], header="path,label")
    (data / ".fairforget-site.key").unlink()
    node = _site(cfg, data, tmp_path / "state-2")
    assert node.bundle.sample_ids([member])[0] != ids  # a new key, new sample ids
    records = {node.bundle.records[int(i)] for i in node.data.ids.tolist()}
    assert member not in records and old not in records
    node.sisa.train_through()
    trained = {int(i) for p in (node.state_dir / "checkpoints").glob("stage-*.pt") for i in torch_load(p)["ids"]}
    gone = set(node.bundle.sample_ids([member, old])[0])
    assert len(gone) == 2 and not gone & trained and not gone & node.sisa.live_ids()

    # a simulation over the folder: the site's tombstones are the data's, whatever the out-dir
    sim = resolve({**TINY, "dataset": "image-folder", "data-root": str(data), "out-dir": str(tmp_path / "sim-1"),
                   "audit": False})
    bundle = load_dataset(sim)
    for k in range(sim.num_shards):
        assert not gone & set(_node(sim, k).data.ids.tolist())
    third = next(int(i) for i in _node(sim, 0).data.ids.tolist())
    node = _node(sim, 0)
    handlers.unlearn(_msg(node, [third]), node)
    assert node.tombstones.path == data / SITE_FILE and not (Path(sim.out_dir) / "tombstones.jsonl").exists()
    again = sim.replace(out_dir=str(tmp_path / "sim-2"))
    for k in range(again.num_shards):
        assert not (gone | {third}) & set(_node(again, k).data.ids.tolist())
    assert Tombstones.for_data(again, bundle.records, run_dir=Path(again.out_dir)).ids() >= gone | {third}


# ---------------------------------------------------------------------- leftovers of a crash, swept
def test_leftover_folders_and_temporaries_are_swept_when_the_node_starts(trained_shard, tmp_path):
    base, prior, _, _ = trained_shard
    cfg = base.replace(out_dir=str(tmp_path / "run"))
    shutil.copytree(base.out_dir, cfg.out_dir)
    node = _node(cfg)
    state, run = node.state_dir, Path(cfg.out_dir)
    checkpoints = _files(state / "checkpoints")
    # a durable_rmtree killed after its rename (a folder that held a deleted record), a replace_dir killed
    # after its first rename (the old folder is the only copy) and after its second, an atomic write's temporary
    (state / "augment" / ".grids.removing-4242").mkdir(parents=True)
    (state / "augment" / ".grids.removing-4242" / "grid.pt").write_bytes(b"trained on a deleted record")
    (state / "augment" / ".generator.old").mkdir()
    (state / "augment" / ".generator.old" / "model.pt").write_bytes(b"the only copy")
    (state / ".checkpoints.old").mkdir()
    (state / ".checkpoints.old" / "stage-1.pt").write_bytes(b"old")
    (state / ".approx.pt.x1y2.tmp").write_bytes(b"half a model")
    (run / ".models.removing-77").mkdir()
    (run / ".metrics.json.abc.tmp").write_bytes(b"{")
    handlers.describe(_msg(node, prior), node)  # the node's first message
    assert not (state / "augment" / ".grids.removing-4242").exists()
    assert (state / "augment" / "generator" / "model.pt").read_bytes() == b"the only copy"  # restored
    assert not (state / ".checkpoints.old").exists() and _files(state / "checkpoints") == checkpoints
    assert not (state / ".approx.pt.x1y2.tmp").exists()
    # the run folder: swept by whoever opens it, holding its lock (a temporary there may be another writer's)
    assert sweep_leftovers(run) == [str(run / ".models.removing-77")]
    assert (run / ".metrics.json.abc.tmp").exists()
