"""A deletion receipt anyone can check: replay a shard's SISA training from scratch and compare.

SISA training here is deterministic (:mod:`fairforget.sisa`: initial weights and every epoch's order
are seeded by seed, shard, stage and epoch alone), so a shard that was unlearned exactly is, bit for
bit, the model trained from scratch on its live samples. :func:`verify_shard` does that training
again, in a temporary folder, on the samples the node's index says are live (the deleted ids left
out), and compares the model hash (:func:`fairforget.storage.state_hash`) with

* the model the server serves (``OUT/models/shard-K.pt``), and
* the ledger's last ``hash_after`` for that shard (the receipt the deletion request was given).

Before replaying it checks the index itself, so that a replay cannot be fooled by it: no id the ledger
records as deleted from the shard is live, and the live slices are the shard's own from-scratch slice
assignment (:func:`fairforget.sisa.assign_slices` over its originals, a synthetic sample in the slice
its id draws) less the deleted ids. A match is then proof that the served model holds no trace of the
deleted records.

Deleted means: in the index's deleted ids, in a ledger line of the shard, or in the data's tombstones
(:mod:`fairforget.tombstones`: ``OUT/tombstones.jsonl``, or beside an image folder's ``labels.csv``).
What cannot be proven is said so, not failed:

* a shard served by an approximate unlearner (a valid ``STATE/approx.pt``): no exactness receipt, but
  its index is checked as above (no deleted id live, the from-scratch slices less the deleted ids)
  and its approximate model must be the one served and the ledger's receipt; a problem there is a
  mismatch;
* a shard trained with DP-SGD, verified by the server (:data:`SITE_ONLY`): its noise and Poisson
  masks were seeded at its site from secure randomness that only the site recorded
  (``STATE/dp-seeds.json``, :mod:`fairforget.sisa`), so the server cannot replay it; the index and the
  receipt are checked (a problem there is a mismatch), and the replay is the site's:
  :func:`verify_site` (``fairforget verify --state-dir STATE``) reads the site's state folder, its
  data and its recorded seeds and replays the shard bit for bit against the model the site serves
  (``fairforget verify --run DIR --site-local`` does so for every shard of a simulation, whose
  state folders sit beside the server's run folder: there the guarantee against the server does
  not hold, in a deployment it does);
* DP-SGD with ``dp-secure-mode``: its noise is cryptographic and cannot be drawn again.

The node state is read, never written: in simulation it is ``OUT/nodes/shard-K`` (``index.json``,
and for an augmented shard ``augment/synthetic.pt``, whose live samples are part of the shard's
pool). The results go to ``OUT/verify.json`` (the last verification of each shard), which the report
shows; a site's own verification writes nothing.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fairforget import __version__
from fairforget.data import load_dataset, shard_of
from fairforget.data.base import SYNTHETIC_ID_BASE, SampleSet, make_sampleset
from fairforget.ledger import REFUSED, Ledger
from fairforget.sisa import SisaError, SisaSettings, SisaShard, assign_slices, derived_seed, read_dp_seeds, served_state
from fairforget.storage import atomic_write_json, read_json, state_hash, torch_load
from fairforget.tombstones import Tombstones
from fairforget.unlearning.approximate import APPROX_FILE

VERIFY_FILE = "verify.json"

# A shard's verdict.
MATCH = "match"  # the replay equals the served model (and the ledger's receipt): exact, proven
MISMATCH = "mismatch"  # the replay, the served model and the receipt disagree, or the index is inconsistent
APPROXIMATE = "approximate"  # served by an approximate unlearner: no exactness receipt (not a failure)
NOT_REPLAYABLE = "not-replayable"  # DP-SGD with secure (cryptographic) noise cannot be drawn again
SITE_ONLY = "site-only"  # DP-SGD: the randomness is the site's secret; only the site can replay it
SITE_ONLY_NOTE = ("DP randomness is the site's secret: the server cannot replay this shard; run `fairforget verify "
                  "--state-dir STATE --data-root ROOT` at the site (in simulation: `fairforget verify --run DIR "
                  "--site-local`)")


class VerifyError(ValueError):
    """Input that cannot be verified (no such shard, no node state); one line for the user."""


@dataclass
class ShardVerdict:
    shard: int
    status: str
    served_hash: str
    replay_hash: str | None = None
    ledger_hash: str | None = None  # the last hash_after the ledger records for the shard
    ledger_request: int | None = None
    index_version: int | None = None
    trained_stages: int = 0
    live: int = 0
    deleted: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    note: str = ""
    ledger_fields: dict[str, Any] = field(default_factory=dict)  # seed, index_version, code_version if recorded

    @property
    def ok(self) -> bool:
        return self.status != MISMATCH

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- node state, read only
@dataclass
class NodeState:
    """What the replay of one shard needs, read from the run folder (nothing is written)."""

    shard: int
    index: dict[str, Any]
    pool: SampleSet  # the node's originals and its synthetic samples
    served_hash: str
    approx_meta: dict[str, Any] | None  # the valid approximate model's metadata, if the shard serves one
    # read at the site only (site-local verification): stage -> the DP seeds recorded for it
    dp_seeds: dict[int, dict[str, Any]] | None = None


def node_dir(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / "nodes" / f"shard-{shard}"


def read_node(run_dir: Path, cfg: Any, originals: SampleSet, shard: int, *, site_local: bool = False) -> NodeState:
    """The shard's index, sample pool, served model hash and approximate state (``site_local``: and
    its recorded DP seeds, as the site reads them); :class:`VerifyError` for anything missing or
    malformed."""
    run_dir, state = Path(run_dir), node_dir(run_dir, shard)
    model_path = run_dir / "models" / f"shard-{shard}.pt"
    if not model_path.is_file():
        raise VerifyError(f"{model_path} is missing: the run serves no model for shard {shard}")
    index = _read_index(state, cfg, shard)
    try:
        served_hash = state_hash(torch_load(model_path))
    except Exception as exc:  # noqa: BLE001 - any unreadable model file is the same one-line error
        raise VerifyError(f"{model_path} is not a readable model: {type(exc).__name__}") from None
    node = NodeState(shard, index, _pool(state, originals), served_hash, _approx_meta(state, index))
    if site_local and cfg.dp:
        node.dp_seeds = _dp_seeds(state)
    return node


def read_site(state: Path, cfg: Any, originals: SampleSet) -> NodeState:
    """A site's shard as the site itself reads it (:func:`verify_site`): its index (the shard is the
    index's), its pool (``originals``: the site's data, and its synthetic samples), the model it
    serves (its valid approximate model, else the checkpoint of its last trained stage) and its
    recorded DP seeds."""
    state = Path(state)
    try:
        shard = int(read_json(state / "index.json")["shard"])
    except FileNotFoundError:
        raise VerifyError(f"{state / 'index.json'} is missing: {state} is not a shard's state folder") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise VerifyError(f"{state / 'index.json'} is not a valid shard index: {type(exc).__name__}") from None
    index = _read_index(state, cfg, shard)
    approx = _approx_meta(state, index)
    if approx is not None:
        served_hash = str(approx["model_hash"])
    elif index["trained"] == 0:
        raise VerifyError(f"shard {shard} in {state} has no trained stage: it serves no model yet")
    else:
        ckpt = state / "checkpoints" / f"stage-{index['trained']}.pt"
        try:
            served_hash = state_hash(served_state(torch_load(ckpt)))  # with its eraser (fairforget.erasure)
        except FileNotFoundError:
            raise VerifyError(f"{ckpt} is missing: shard {shard} has no model for its trained stage "
                              f"{index['trained']}") from None
        except Exception as exc:  # noqa: BLE001
            raise VerifyError(f"{ckpt} is not a readable checkpoint: {type(exc).__name__}") from None
    node = NodeState(shard, index, _pool(state, originals), served_hash, approx)
    if cfg.dp:
        node.dp_seeds = _dp_seeds(state)
    return node


def _dp_seeds(state: Path) -> dict[int, dict[str, Any]]:
    """stage -> the DP seeds the site recorded for the training that made its checkpoint."""
    try:
        return {int(k): v for k, v in read_dp_seeds(state)["stages"].items()}
    except SisaError as exc:
        raise VerifyError(str(exc)) from None


def _read_index(state: Path, cfg: Any, shard: int) -> dict[str, Any]:
    index_path = state / "index.json"
    if not index_path.is_file():
        raise VerifyError(f"{index_path} is missing: shard {shard}'s node state is not in this run folder "
                          "(a deployment keeps it at its site)")
    try:
        index = read_json(index_path)
        slices = [[int(i) for i in sl] for sl in index["slices"]]
        index.update(slices=slices, deleted=[int(i) for i in index["deleted"]], trained=int(index["trained"]),
                     version=int(index["version"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise VerifyError(f"{index_path} is not a valid shard index: {type(exc).__name__}: {exc}") from None
    if index.get("shard") != shard or len(slices) != cfg.slices or not 0 <= index["trained"] <= cfg.slices:
        raise VerifyError(f"{index_path} belongs to shard {index.get('shard')} with {len(slices)} slices and "
                          f"{index['trained']} trained, not to shard {shard} of a run with {cfg.slices} slices")
    return index


def _pool(state: Path, originals: SampleSet) -> SampleSet:
    """The node's originals plus its synthetic samples (``STATE/augment/synthetic.pt``: x, y, private,
    ids; written by the node's augmentation store), as the node builds its SISA shard."""
    path = state / "augment" / "synthetic.pt"
    if not path.is_file():
        return originals
    try:
        blob = torch_load(path)
        synth = make_sampleset(blob["x"], blob["y"].numpy(), blob["private"].numpy(), blob["ids"].numpy())
    except Exception as exc:  # noqa: BLE001
        raise VerifyError(f"{path} is not a readable synthetic-sample file: {type(exc).__name__}") from None
    return SampleSet.concat([originals, synth]) if len(synth) else originals


def _approx_meta(state: Path, index: Mapping[str, Any]) -> dict[str, Any] | None:
    """The approximate model's metadata when ``approx.pt`` is valid (made for this index version:
    :mod:`fairforget.unlearning.approximate`), else None."""
    path = state / APPROX_FILE
    if not path.is_file():
        return None
    try:
        saved = torch_load(path)
        meta = dict(saved["meta"])
        int(meta["index_version"])
        meta["model_hash"] = state_hash(saved["model"])  # what the node serves, to compare with the run's
    except Exception as exc:  # noqa: BLE001
        raise VerifyError(f"{path} is not a readable approximate model: {type(exc).__name__}") from None
    return meta if int(meta["index_version"]) == int(index["version"]) else None


# ---------------------------------------------------------------------- checks on the index
def ledger_lines(entries: list[dict[str, Any]], shard: int) -> list[dict[str, Any]]:
    """The shard's completed ledger lines (a decision that changed its model: it has ``hash_after``)."""
    return [e for e in entries
            if e.get("shard") == shard and e.get("decision") != REFUSED and e.get("hash_after")]


def index_problems(node: NodeState, settings: SisaSettings | None, ledger_deleted: set[int],
                   tombstoned: set[int]) -> list[str]:
    """Where the index is not the shard's from-scratch slice assignment less the deleted ids (not
    checked without ``settings``), or still holds an id the ledger or the data's owner (its
    tombstones) deleted. An approximate shard's index is checked alike; its retrain target above the
    trained stages is where an exact retrain goes back to, not a pending retrain."""
    index, problems = node.index, []
    live = [i for sl in index["slices"] for i in sl]
    deleted = set(index["deleted"])
    if len(live) != len(set(live)):
        problems.append("an id is live in two slices")
    resurrected = sorted(set(live) & (deleted | ledger_deleted | tombstoned))
    if resurrected:
        problems.append(f"deleted id(s) still live: {_fmt(resurrected)}")
    unrecorded = sorted(ledger_deleted - deleted)
    if unrecorded:
        problems.append(f"id(s) the ledger deleted are not deleted in the index: {_fmt(unrecorded)}")
    if int(index.get("target", 0)) > index["trained"] and node.approx_meta is None:
        problems.append(f"a retrain is pending (stage {index['trained']} of target {index['target']}): "
                        "the node finishes it before its next message")
    # the originals' slices come from the shard's original ids alone (assign_slices): those in its data
    # when the index was made (an id tombstoned before then never entered it) and those deleted since;
    # a synthetic id draws its own slice from (seed, shard, id) (SisaShard.add)
    pool = {int(i) for i in node.pool.ids.tolist()}
    never = tombstoned - deleted - set(live)
    originals = sorted({i for i in (pool - never) | deleted if i < SYNTHETIC_ID_BASE})
    expected = assign_slices(originals, settings.slices, settings.seed, node.shard) if settings else []
    for s, members in enumerate(index["slices"] if settings else []):
        want = set(expected[s]) - deleted
        have = {i for i in members if i < SYNTHETIC_ID_BASE}
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            problems.append(f"slice {s + 1} is not the from-scratch assignment (extra: {_fmt(extra)}; "
                            f"missing: {_fmt(missing)})")
        wrong = sorted(i for i in members if i >= SYNTHETIC_ID_BASE
                       and derived_seed(settings.seed, node.shard, 91, i) % settings.slices != s)
        if wrong:
            problems.append(f"synthetic id(s) in slice {s + 1} belong to another slice: {_fmt(wrong)}")
    unknown = sorted(set(live) - pool)
    if unknown:
        problems.append(f"live id(s) with no sample in the node's data: {_fmt(unknown)}")
    return problems


# ---------------------------------------------------------------------- replay
def replay_hash(node: NodeState, settings: SisaSettings) -> str:
    """Train the shard from scratch in a temporary folder, on the index's live slices, through the
    stages the index has trained (under DP with the site's recorded seeds, ``node.dp_seeds``); the
    model's hash."""
    live = sorted(i for sl in node.index["slices"] for i in sl)
    data = node.pool.select_ids(live)
    seeds = None if node.dp_seeds is None else {
        k: (int(v["sample_seed"]), int(v["noise_seed"])) for k, v in node.dp_seeds.items()}
    with tempfile.TemporaryDirectory(prefix=f"fairforget-verify-{node.shard}-") as tmp:
        shard = SisaShard(Path(tmp), node.shard, data, settings, slices=node.index["slices"], replay_seeds=seeds)
        shard.train_through(node.index["trained"])
        return shard.model_hash()


def seed_problems(node: NodeState) -> list[str]:
    """Where the site's recorded DP seeds do not cover the trained stages, or were drawn for stages
    of another size than the index's (the checkpoint is then not the training they seeded)."""
    seeds, problems = node.dp_seeds or {}, []
    missing = [r for r in range(1, node.index["trained"] + 1) if r not in seeds]
    if missing:
        problems.append(f"no recorded DP seeds for stage(s) {_fmt(missing)} (STATE/dp-seeds.json): "
                        "the shard's training cannot be replayed")
    for r in range(1, node.index["trained"] + 1):
        recorded = (seeds.get(r) or {}).get("samples")
        size = sum(len(sl) for sl in node.index["slices"][:r])
        if recorded is not None and int(recorded) != size:
            problems.append(f"stage {r}'s DP seeds were drawn for {recorded} samples, its slices hold {size}")
    return problems


def verify_shard(node: NodeState, settings: SisaSettings | None, ledger: list[dict[str, Any]],
                 tombstoned: set[int] | None = None) -> ShardVerdict:
    """Verify one shard (``settings`` None: its training cannot be replayed, DP secure mode;
    ``ledger``: the run's ledger entries; ``tombstoned``: the ids the data's owner deleted,
    :mod:`fairforget.tombstones`). Under DP the replay needs the site's recorded seeds
    (``node.dp_seeds``, read at the site): without them, :data:`SITE_ONLY` once the index and the
    receipt check out."""
    index = node.index
    lines = ledger_lines(ledger, node.shard)
    last = lines[-1] if lines else None
    verdict = ShardVerdict(
        shard=node.shard, status=MISMATCH, served_hash=node.served_hash,
        ledger_hash=str(last["hash_after"]) if last else None,
        ledger_request=int(last["request"]) if last and "request" in last else None,
        index_version=index["version"], trained_stages=index["trained"],
        live=sum(len(sl) for sl in index["slices"]), deleted=len(index["deleted"]),
        ledger_fields={k: last[k] for k in ("seed", "index_version", "code_version") if last and k in last},
    )
    if node.approx_meta is not None:  # no replay, but its index and its model are checked
        ledger_deleted = {int(i) for e in lines for i in e.get("ids", [])}
        verdict.problems = index_problems(node, settings, ledger_deleted, set(tombstoned or ()))
        if node.approx_meta.get("model_hash") not in (None, node.served_hash):
            verdict.problems.append(f"the served model {node.served_hash} is not the node's approximate model "
                                    f"{node.approx_meta['model_hash']}")
        if verdict.ledger_hash is not None and verdict.ledger_hash != node.served_hash:
            verdict.problems.append(f"the served model {node.served_hash} is not the ledger's receipt "
                                    f"{verdict.ledger_hash} (request {verdict.ledger_request})")
        verdict.status = MISMATCH if verdict.problems else APPROXIMATE
        verdict.note = (f"no exactness receipt (served by {node.approx_meta.get('method', '?')}; "
                        "an exact retrain, forget --method exact-sisa, makes it verifiable)")
        return verdict
    if settings is None:
        verdict.status = NOT_REPLAYABLE
        verdict.note = "DP-SGD with dp-secure-mode: cryptographic noise cannot be replayed"
        return verdict
    ledger_deleted = {int(i) for e in lines for i in e.get("ids", [])}
    verdict.problems = index_problems(node, settings, ledger_deleted, set(tombstoned or ()))
    if "seed" in verdict.ledger_fields and int(verdict.ledger_fields["seed"]) != settings.seed:
        verdict.problems.append(f"the ledger's seed {verdict.ledger_fields['seed']} is not the run's {settings.seed}")
    if settings.dp is not None and node.dp_seeds is None:  # the server: everything but the replay
        if verdict.ledger_hash is not None and verdict.ledger_hash != node.served_hash:
            verdict.problems.append(f"the served model {node.served_hash} is not the ledger's receipt "
                                    f"{verdict.ledger_hash} (request {verdict.ledger_request})")
        verdict.status = MISMATCH if verdict.problems else SITE_ONLY
        verdict.note = SITE_ONLY_NOTE
        return verdict
    if node.dp_seeds is not None:
        verdict.problems += seed_problems(node)
        verdict.note = "replayed at the site with its recorded DP seeds"
    t0 = time.perf_counter()
    if not any(p.startswith(("live id(s) with no sample", "no recorded DP seeds")) for p in verdict.problems):
        try:
            verdict.replay_hash = replay_hash(node, settings)
        except SisaError as exc:  # e.g. a DP replay refused by the epsilon cap
            verdict.problems.append(f"replay failed: {exc}")
    verdict.seconds = time.perf_counter() - t0
    if verdict.replay_hash is not None and verdict.replay_hash != node.served_hash:
        verdict.problems.append(f"the served model {node.served_hash} is not the replay {verdict.replay_hash}")
    if verdict.ledger_hash is not None and verdict.ledger_hash != node.served_hash:
        verdict.problems.append(f"the served model {node.served_hash} is not the ledger's receipt "
                                f"{verdict.ledger_hash} (request {verdict.ledger_request})")
    if not verdict.problems and verdict.replay_hash is not None:
        verdict.status = MATCH
    return verdict


def verify_run(run_dir: Path, cfg: Any, shards: list[int], *, site_local: bool = False) -> list[ShardVerdict]:
    """Verify ``shards`` of the run in ``run_dir`` (config ``cfg``). Every input is read and checked
    before the first replay, so bad input raises :class:`VerifyError` having spent nothing. A DP
    shard is :data:`SITE_ONLY` unless ``site_local`` (a simulation: each shard's state folder,
    ``OUT/nodes/shard-K``, is read as its site would read it, its recorded DP seeds included)."""
    bundle = load_dataset(cfg)
    parts = shard_of(cfg, bundle)
    bad = [k for k in shards if not 0 <= k < len(parts)]
    if bad:
        raise VerifyError(f"no shard {bad[0]}: the run has shards 0-{len(parts) - 1}")
    nodes = [read_node(run_dir, cfg, parts[k], k, site_local=site_local) for k in shards]
    secure = bool(cfg.dp and cfg.dp_secure_mode)
    settings = None if secure else SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    try:
        ledger = Ledger(Path(run_dir) / "ledger.jsonl").entries()
        tombstoned = Tombstones.for_data(cfg, bundle.records, run_dir=Path(run_dir)).ids()
    except ValueError as exc:  # a broken ledger or tombstone line: one line, as the ledger words it
        raise VerifyError(str(exc)) from None
    return [verify_shard(node, settings, ledger, tombstoned) for node in nodes]


def verify_site(state: Path, cfg: Any, *, tombstones: str | Path | None = None) -> ShardVerdict:
    """A site verifies its own shard (``fairforget verify --state-dir STATE --data-root ROOT``): its
    data is ``cfg.data_root`` (its whole training split is its shard, as the node reads it), its
    deletions are the index's and its data's tombstones (``tombstones``: the node-config key of that
    name), and its training is replayed with the DP seeds recorded in ``STATE/dp-seeds.json``, bit for
    bit, against the model it serves. Nothing is written."""
    if not str(cfg.data_root).strip():
        raise VerifyError("a site's verification needs its data: --data-root (the site's image folder)")
    bundle = load_dataset(cfg)
    node = read_site(Path(state), cfg, bundle.train)
    secure = bool(cfg.dp and cfg.dp_secure_mode)
    settings = None if secure else SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    try:
        tombstoned = Tombstones.for_data(cfg, bundle.records, path=tombstones).ids()
    except ValueError as exc:
        raise VerifyError(str(exc)) from None
    return verify_shard(node, settings, [], tombstoned)


# ---------------------------------------------------------------------- verify.json
def write_verification(run_dir: Path, verdicts: list[ShardVerdict]) -> dict[str, Any]:
    """Merge ``verdicts`` into ``OUT/verify.json`` (the last verification of each shard), atomically."""
    path = Path(run_dir) / VERIFY_FILE
    record = read_verification(run_dir) or {"shards": {}}
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    for v in verdicts:
        record["shards"][str(v.shard)] = {"time": stamp, "code_version": __version__, **v.to_dict()}
    record["shards"] = dict(sorted(record["shards"].items(), key=lambda kv: int(kv[0])))
    record["last"] = {"time": stamp, "shards": [v.shard for v in verdicts], "ok": all(v.ok for v in verdicts)}
    atomic_write_json(path, record)
    return record


def read_verification(run_dir: Path) -> dict[str, Any] | None:
    """``OUT/verify.json``, or None when there is none (or it is not one: it is derived, and is redone)."""
    path = Path(run_dir) / VERIFY_FILE
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("shards"), dict) else None


def _fmt(ids: list[int], limit: int = 10) -> str:
    text = ", ".join(map(str, ids[:limit])) or "none"
    return text + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


__all__ = ["APPROXIMATE", "MATCH", "MISMATCH", "NOT_REPLAYABLE", "SITE_ONLY", "ShardVerdict", "VerifyError",
           "read_node", "read_site", "read_verification", "verify_run", "verify_shard", "verify_site",
           "write_verification"]
