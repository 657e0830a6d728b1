"""The ClientApp's message handlers: train (a SISA stage, or FedAvg local epochs), unlearn, describe,
audit.

Each takes the incoming message's records and the :class:`clients.node.Node`, does its work, and
returns the reply's RecordDict. :mod:`clients.app` only wires them to Flower. Every handler runs
holding the node's state lock, after the node has finished what a crash interrupted
(:func:`on_node`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients.node import Node
from fairforget import keys
from fairforget.audit import parse_attacks
from fairforget.audit.site import SiteAudit, site_audit, site_seed
from fairforget.data.base import is_synthetic
from fairforget.ensemble import Ensemble
from fairforget.metrics import accuracy_report, group_counts, kl_from_uniform
from fairforget.model import load_model
from fairforget.records import unpack_shards
from fairforget.schemas import payloads
from fairforget.sisa import derived_seed
from fairforget.storage import state_hash
from fairforget.training import train as train_model
from fairforget.unlearning import EXACT, UnlearnResult, approximate, get_check, get_unlearner, unlearn_params

Handler = Callable[[RecordDict, Node], RecordDict]


def on_node(handler: Handler) -> Handler:
    """Run ``handler`` holding the node's state folder, after :meth:`Node.resume`; a node kept from an
    earlier message is first checked against its state on disk (:meth:`Node.current`)."""

    @functools.wraps(handler)
    def run(content: RecordDict, node: Node) -> RecordDict:
        with node.locked():
            node = node.current()  # a node kept from an earlier message: rebuilt if its state changed on disk
            try:
                node.pin_key()
                node.resume()
                reply = handler(content, node)
            except BaseException:
                node.uncache()
                raise
            node.remember()
            return reply

    return run


def _shard_metrics(node: Node, data_len: int, seconds: float, sisa: bool = True) -> MetricRecord:
    """The reply's figures; ``sisa``: the node trains its own SISA shard (its live data), else it trains
    the global model on all of its data (the train message's mode says which)."""
    live = node.sisa.live_data() if sisa else node.data
    counts = group_counts(live.y, live.private, node.bundle.num_classes, node.bundle.num_private)
    return MetricRecord({
        keys.SHARD: node.shard,
        keys.NUM_EXAMPLES: data_len,
        keys.TRAIN_SECONDS: seconds,
        keys.KL_BIAS: kl_from_uniform(counts),  # one number: per-group counts never leave the site
    })


def _privacy_info(node: Node, sisa: bool = True) -> dict[str, str]:
    """The shard's cumulative DP spend for the reply's ConfigRecord (nothing without DP-SGD at this
    site: no SISA shard, ``sisa`` False, or no accountant)."""
    if not sisa or node.sisa.accountant is None:
        return {}
    return {keys.DP_JSON: payloads.encode(payloads.DpSpend, node.sisa.privacy_summary())}


@on_node
def train(content: RecordDict, node: Node) -> RecordDict:
    config = content[keys.CONFIG]
    mode = config[keys.TRAIN_MODE]
    if mode == keys.TRAIN_MODE_SISA:
        stage = int(config[keys.STAGE])
        shard = node.sisa
        if stage > shard.trained:  # a resent round is answered from the checkpoint
            shard.train_stage(stage)
        state = shard.model_state(stage)
        # train-seconds: the shard's SISA training compute so far (all stages), the full-retrain cost
        metrics = _shard_metrics(node, len(shard.live_ids()), shard.full_train_seconds())
    elif mode == keys.TRAIN_MODE_LOCAL:
        cfg, settings = node.cfg, node.sisa_settings
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        model = load_model(content[keys.ARRAYS].to_torch_state_dict(), node.bundle.num_classes, cfg.model_width)
        model.to(settings.device)
        objective = settings.build_objective().to(settings.device)
        rnd = int(config[keys.SERVER_ROUND])
        seeds = [derived_seed(cfg.seed, node.shard, rnd, e) for e in range(cfg.local_epochs)]
        result = train_model(model, node.data, seeds=seeds, batch_size=cfg.batch_size, objective=objective,
                             optimizer=settings.optimizer.build(model, objective))
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        metrics = _shard_metrics(node, len(node.data), result.seconds, sisa=False)
    else:
        raise ValueError(f"unknown train mode {mode!r}")
    info = ConfigRecord({keys.MODEL_HASH: state_hash(state), **_privacy_info(node, mode == keys.TRAIN_MODE_SISA)})
    return RecordDict({
        keys.ARRAYS: ArrayRecord(state),
        keys.METRICS: metrics,
        keys.CONFIG: info,
    })


@on_node
def unlearn(content: RecordDict, node: Node) -> RecordDict:
    """Delete ``ids`` from this shard. Every check that can refuse the deletion (an id not in the
    shard, a method not allowed here, the DP cap: the unlearner's ``check``) runs first, with nothing
    written, so a refusal leaves the node's state and the tombstones as they were; then the ids are
    tombstoned at the data's owner (fsynced) and only then does the shard change. A re-sent request
    (the server reconciling after a crash) whose ids this node already deleted is answered from its
    state, finished by :meth:`Node.resume`, with ``resumed`` set."""
    config = content[keys.CONFIG]
    ids = [int(i) for i in config[keys.FORGET_IDS]]
    method = str(config.get(keys.UNLEARN_METHOD, EXACT))
    options = {k.replace("-", "_"): config[k] for k in keys.REQUEST_OPTIONS if k in config}
    if options:  # the request's own options travel in this message, not in the run config every site gets
        node.set_config(node.cfg.replace(**options))
    _, gone = describe_ids(node, ids)
    todo = [i for i in ids if i not in set(gone)]
    augmented = node.augmented
    if augmented and method != EXACT:  # an augmented shard: exact, and the generator forgets too
        raise ValueError(f"shard {node.shard} is augmented: only {EXACT} unlearning also removes a sample "
                         f"from its generator and synthetic data (asked for {method})")
    state = (lambda: node.sisa.model_state()) if augmented else (lambda: approximate.current_state(node.sisa))
    if not todo:
        result = _resumed(node, method, state())
        return _unlearn_reply(node, result, state())
    params = unlearn_params(node.cfg, method)  # with the method's own options (unlearner-options)
    if augmented:
        owned, _ = node.augmenter.owned(todo)
        unknown = sorted(set(todo) - set(owned))
        if unknown:
            raise ValueError(f"sample id(s) not in shard {node.shard}: {', '.join(map(str, unknown))}")
        live = node.sisa.live_ids()
        get_check(EXACT)(node.sisa, [i for i in todo if i in live], params)  # the retrain's DP spend
    else:
        get_check(method)(node.sisa, todo, params)  # every refusal before anything is written
    unlearner = get_unlearner(method)
    node.delete(todo)  # the owner's tombstones (durable) first: from here on a crash is finished by Node.resume
    if augmented:
        result = node.augmenter.forget(todo)
    else:
        result = unlearner(node.sisa, todo, params)
    result = replace(result, index_version=int(node.sisa.index["version"]))
    return _unlearn_reply(node, result, state())  # the approximate model, if any


def _resumed(node: Node, method: str, state: dict[str, torch.Tensor]) -> UnlearnResult:
    """The result for a deletion committed before (its retrain finished by :meth:`Node.resume`)."""
    meta = approximate.meta(node.sisa)
    return UnlearnResult(
        shard=node.shard, method=str(meta["method"]) if meta else EXACT, restart_stage=node.sisa.trained,
        retrained_stages=0, seconds=0.0, wall_seconds=0.0, hash_before="", hash_after=state_hash(state),
        num_examples=len(node.sisa.live_ids()), full_train_seconds=node.sisa.full_train_seconds(),
        approx_deletions=int(meta["approx_deletions"]) if meta else 0, resumed=True,
        index_version=int(node.sisa.index["version"]),
    )


def describe_ids(node: Node, asked: list[int]) -> tuple[list[int], list[int]]:
    """(the asked ids this node holds, those it has deleted: in its index's or its generator's
    deleted list, or tombstoned at the data's owner)."""
    shard = node.sisa
    tomb = node.tombstones.ids()
    if node.augmented:  # retired originals are still held (by the generator's data)
        owned, gone = node.augmenter.owned(asked)
        return owned, sorted(set(gone) | (set(asked) & tomb - set(owned)))
    live, deleted = shard.live_ids(), shard.deleted | tomb
    return [i for i in asked if i in live], [i for i in asked if i in deleted and i not in live]


def _unlearn_reply(node: Node, result: UnlearnResult, state: dict[str, torch.Tensor]) -> RecordDict:
    """The ``train.unlearn`` reply: the shard's model, the unlearner's result and the shard's bias."""
    metrics, info = result.to_records()
    info.update(_privacy_info(node))
    bias = _shard_metrics(node, result.num_examples, result.seconds)
    metrics.update({k: v for k, v in bias.items() if k not in metrics})
    return RecordDict({keys.ARRAYS: ArrayRecord(state), keys.METRICS: metrics, keys.CONFIG: info})


@on_node
def augment(content: RecordDict, node: Node) -> RecordDict:
    """One augmentation step (:mod:`clients.augment`): retire originals, (re)train the generator if
    needed, generate what the bias plan asks for, retrain the shard. Replies with the shard model and
    the step's figures (counts and statistics only, never samples)."""
    config = content[keys.CONFIG]
    cfg = node.cfg
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    from fairforget.diffusion.quality import FidelityClassifiers  # the diffusion stack: augmenting nodes only

    fidelity = None
    if keys.ARRAYS in content:
        fidelity = FidelityClassifiers.from_state(content[keys.ARRAYS].to_torch_state_dict(),
                                                  node.bundle.num_classes, node.bundle.num_private)
    report = node.augmenter.step(int(config[keys.STEP]), int(config[keys.RETIRE]), fidelity)
    node.uncache()  # the generator's data and the shard's synthetic samples: rebuilt from disk next time
    state = node.sisa.model_state()
    metrics = _shard_metrics(node, len(node.sisa.live_ids()), node.sisa.full_train_seconds())
    info = ConfigRecord({keys.MODEL_HASH: state_hash(state),
                         keys.AUGMENT_JSON: payloads.encode(payloads.AugmentReport, report), **_privacy_info(node)})
    return RecordDict({keys.ARRAYS: ArrayRecord(state), keys.METRICS: metrics, keys.CONFIG: info})


@on_node
def audit(content: RecordDict, node: Node) -> RecordDict:
    """Audit the model this site serves, on its own live members and held-out data, with every
    configured attack and reference models trained here (:mod:`fairforget.audit.site`); with
    ``site-audit-scope = "ensemble"`` also the ensemble the server sent. Any other model is refused:
    under the default scope a site receives no weights. The message says which model is the site's
    (``model-target``): its own shard model, or the one global model it carries (an averaging
    strategy's, which every client already trains from). Replies with ROC statistics only."""
    cfg = node.cfg
    scope = str(content[keys.CONFIG][keys.AUDIT_SCOPE])
    target = str(content[keys.CONFIG].get(keys.MODEL_TARGET, ""))
    if scope != cfg.site_audit_scope:
        raise ValueError(f"a {scope!r} site audit was asked for, but this run's site-audit-scope is "
                         f"{cfg.site_audit_scope!r}")
    sent = unpack_shards(content[keys.ARRAYS]) if keys.ARRAYS in content else {}
    num_classes = node.bundle.num_classes
    if target == keys.TARGET_OWN_SHARD:
        if scope == "shard" and sent:
            raise ValueError(f"site-audit-scope = 'shard': this site audits only its own model and takes no "
                             f"weights, got shard(s) {', '.join(map(str, sorted(sent)))}")
        own = node.sisa.model_state() if node.augmented else approximate.current_state(node.sisa)
        targets = {f"shard-{node.shard}": [load_model(own, num_classes, cfg.model_width)]}
        if scope == "ensemble":  # combined as the run's strategy predicts (its vote and weights)
            rule = payloads.decode(payloads.EnsembleRule, content[keys.CONFIG].get(keys.ENSEMBLE_RULE, "{}")).to_json()
            targets["ensemble"] = Ensemble.from_rule(sent, num_classes, cfg.model_width, rule)
        members = node.sisa.live_data()
    elif target == keys.TARGET_SENT:  # an averaging strategy: one global model
        if set(sent) != {0}:
            raise ValueError("a site audit of the global model takes exactly that model")
        own = sent[0]
        targets = {"global": [load_model(own, num_classes, cfg.model_width)]}
        members = node.data
    else:
        raise ValueError(f"{keys.MODEL_TARGET} must be {keys.TARGET_OWN_SHARD!r} or {keys.TARGET_SENT!r}, "
                         f"got {target!r}")
    members = members.subset(np.flatnonzero(~is_synthetic(members.ids)))  # members are real people
    gone = node.tombstones.ids()
    heldout = node.heldout.subset([i for i, sid in enumerate(node.heldout.ids.tolist()) if sid not in gone])
    result = site_audit(targets, members, heldout, attacks=parse_attacks(cfg.audit_attacks, cfg.attack_options),
                        settings=node.sisa_settings, references=cfg.audit_references,
                        bootstrap=cfg.audit_bootstrap, seed=site_seed(cfg.seed, node.shard),
                        cache_dir=node.state_dir / "audit", attack_options=cfg.attack_options)
    return SiteAudit(shard=node.shard, site=node.site, scope=scope, model_hash=state_hash(own),
                     **result).to_records()


def identify(content: RecordDict, node: Node) -> RecordDict:
    """Who this node is: the shard it serves (the one the server assigned), what its own config claims
    (``partition-id``, site name: the server cross-checks them against the operator's binding file),
    and the task's label counts (for a server without data); nothing about any record. Not under the
    state lock: it reads no state."""
    claim = {} if node.partition_id is None else {keys.NODE_PARTITION_ID: node.partition_id}
    return RecordDict({
        keys.CONFIG: ConfigRecord({keys.SITE: node.site}),
        keys.METRICS: MetricRecord({keys.SHARD: node.shard, keys.NUM_CLASSES: node.bundle.num_classes,
                                    keys.NUM_PRIVATE: node.bundle.num_private, keys.NUM_EXAMPLES: len(node.data),
                                    **claim}),
    })


@on_node
def evaluate(content: RecordDict, node: Node) -> RecordDict:
    """This site's model on this site's own test split (biased: as it is; unbiased: every (class,
    private) group subsampled to the same size): accuracies and each group's accuracy as fractions,
    never counts per group, samples or ids. The message says which model (``model-target``): the
    site's own shard model, or the one global model it carries."""
    config = content.get(keys.CONFIG) or ConfigRecord({})
    target = str(config.get(keys.MODEL_TARGET, ""))
    if target == keys.TARGET_SENT:
        sent = unpack_shards(content[keys.ARRAYS])
        if set(sent) != {0}:
            raise ValueError("an evaluation of the global model takes exactly that model")
        state = sent[0]
    elif target == keys.TARGET_OWN_SHARD:
        state = approximate.current_state(node.sisa)
    else:
        raise ValueError(f"{keys.MODEL_TARGET} must be {keys.TARGET_OWN_SHARD!r} or {keys.TARGET_SENT!r}, "
                         f"got {target!r}")
    model = load_model(state, node.bundle.num_classes, node.cfg.model_width)
    out = {}
    for name, data in (("biased", node.bundle.test_biased), ("unbiased", node.bundle.test_unbiased)):
        with torch.no_grad():
            pred = model(data.x).argmax(-1)
        rep = accuracy_report(pred, data, node.bundle.num_classes, node.bundle.num_private)
        out[name] = {"accuracy": rep["accuracy"], "n": rep["n"],
                     "worst_group": {k: v for k, v in rep["worst_group"].items() if k != "n"},
                     "groups": [{k: v for k, v in g.items() if k != "n"} for g in rep["groups"]]}
    return RecordDict({
        keys.CONFIG: ConfigRecord({keys.EVAL_JSON: payloads.encode(payloads.SiteEvaluation, out)}),
        keys.METRICS: MetricRecord({keys.SHARD: node.shard}),
    })


@on_node
def describe(content: RecordDict, node: Node) -> RecordDict:
    """Which of the asked ids this node holds, and which it has already deleted. A site asked for its
    own record ids (``forget-records``) maps them to its sample ids and names the ones it does not have."""
    config = content[keys.CONFIG]
    asked = [int(i) for i in config[keys.FORGET_IDS]]
    unknown: list[str] = []
    if keys.FORGET_RECORDS in config:
        found, unknown = node.bundle.sample_ids([str(r) for r in config[keys.FORGET_RECORDS]])
        asked = sorted(set(asked) | set(found))
    shard = node.sisa
    live = shard.live_ids()
    owned, gone = describe_ids(node, asked)
    if keys.FORGET_RECORDS in config:  # a record id of this site that is no training member here
        unknown += [node.bundle.record_of(i) for i in asked if i not in set(owned) | set(gone)]
    return RecordDict({
        keys.CONFIG: ConfigRecord({
            keys.OWNED_IDS: owned,
            keys.DELETED_IDS: gone,
            **({keys.UNKNOWN_RECORDS: unknown} if keys.FORGET_RECORDS in config else {}),
            **_privacy_info(node),
        }),
        keys.METRICS: MetricRecord({keys.SHARD: node.shard, keys.NUM_EXAMPLES: len(live), keys.TRAINED: shard.trained}),
    })
