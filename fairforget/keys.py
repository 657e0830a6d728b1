"""Message types and record keys shared by the ServerApp, the strategies and the ClientApp.

One module, so that the two sides of every message agree on its spelling.
"""

# Message types (``<category>.<action>``); the ClientApp registers one handler for each.
MSG_TRAIN = "train"
MSG_UNLEARN = "train.unlearn"
MSG_DESCRIBE = "query.describe"
MSG_AUDIT = "query.audit"
MSG_AUGMENT = "train.augment"
MSG_IDENTIFY = "query.identify"  # a node says its shard and site, nothing else
MSG_EVALUATE = "query.evaluate"  # a site evaluates on its own test split (a server without data)

# Record names inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Keys of the ConfigRecord the server sends.
TRAIN_MODE = "train-mode"  # "sisa-stage" or "local-epochs"
STAGE = "stage"  # SISA stage (1-based slice count) to train
SERVER_ROUND = "server-round"
SEED = "seed"  # the run's seed, in every round's train config
FORGET_IDS = "forget-ids"  # list of sample ids, for train.unlearn and query.describe
STEP = "step"  # augmentation step (0 = first augmentation)
RETIRE = "retire"  # originals to retire (unlearn) in this augmentation step
UNLEARN_METHOD = "method"  # train.unlearn (and its reply): an unlearner's name (fairforget.unlearning.unlearner)
# train.unlearn: a deletion request's own options (fairforget/requests.py), for the owning node alone
# (unlearn-method and unlearner-options: the node gives the method's own options to the method asked
# for, and its defaults to the exact fallback of a spent budget: fairforget.unlearning.unlearn_params)
REQUEST_OPTIONS = ("unlearn-epochs", "unlearn-lr", "newton-lambda", "augment-on-delete", "unlearn-method",
                   "unlearner-options")

TRAIN_MODE_SISA = "sisa-stage"
TRAIN_MODE_LOCAL = "local-epochs"

# query.audit and query.evaluate: which model the site scores, decided by the strategy's capabilities
# (keeps_shard_models), so that a site never needs the strategy's name.
MODEL_TARGET = "model-target"
TARGET_OWN_SHARD = "own-shard"  # the shard model this site trained and serves (no weights sent)
TARGET_SENT = "sent"  # the one global model the message carries (an averaging strategy)

# Keys of the MetricRecord / ConfigRecord a client replies with.
SHARD = "shard"
NUM_EXAMPLES = "num-examples"
TRAIN_SECONDS = "train-seconds"
KL_BIAS = "kl-bias"
MODEL_HASH = "model-hash"
HASH_BEFORE = "hash-before"
RESTART_SLICE = "restart-slice"
OWNED_IDS = "owned-ids"
DELETED_IDS = "deleted-ids"
AUDIT_JSON = "audit-json"  # a site's ROC statistics, as JSON text
AUDIT_SCOPE = "audit-scope"  # query.audit: "shard" (no weights sent) or "ensemble" (every shard's weights)
ENSEMBLE_RULE = "ensemble-rule"  # query.audit, scope "ensemble": JSON {"vote", "weights"}, how the sent models combine
AUGMENT_JSON = "augment-json"  # an augmentation step's report (counts, seconds, quality), as JSON text
APPROX_DELETIONS = "approx-deletions"  # deletions served approximately since the last exact retrain
RETRAINED_STAGES = "retrained-stages"
WALL_SECONDS = "wall-seconds"
FULL_TRAIN_SECONDS = "full-train-seconds"
SITE = "site"
NUM_CLASSES = "num-classes"
NUM_PRIVATE = "num-private"
FORGET_RECORDS = "forget-records"  # a site's own record ids (a deletion request at one site)
UNKNOWN_RECORDS = "unknown-records"  # record ids a site does not hold (echoed back)
EVAL_JSON = "eval-json"  # a site's evaluation (accuracies, group accuracies as fractions), as JSON text
RESUMED = "resumed"  # 1: a re-sent deletion the node had already committed (reconciliation)
INDEX_VERSION = "index-version"  # the shard index's version after a deletion (what a replay starts from)
TRAINED = "trained"  # SISA stages a node has trained (query.describe)
DP_JSON = "dp-json"  # a shard's cumulative DP spend (fairforget.privacy.accountant.summarize), as JSON text

# Key the strategies add to a shard's recorded reply figures (not sent): the node that replied.
NODE_ID = "node-id"

# Node-config keys (deployment: set per SuperNode; simulation: set by Flower).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_STATE_DIR = "state-dir"
NODE_DATA_ROOT = "data-root"
NODE_SITE = "site"  # the site's name (default site-<partition-id>)
NODE_TOMBSTONES = "tombstones"  # the site's deletion list (default: DATA_ROOT/.fairforget-tombstones.jsonl)
