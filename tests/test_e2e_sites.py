"""Hospital sites for real, under Flower's deployment engine: TLS, SuperNode authentication, each
site's own image folder and state folder, a server without patient data, deletion at one site,
and node loss. Every command here is one the README's "Deploying across sites" section shows.

One federation for the module (starting it costs more than a tiny run): certificates and keys from
``simulations/make_certs.py``; a ``flower-superlink`` with TLS and ``--enable-supernode-auth``; two
sites' public keys registered with ``flwr supernode register``; two ``flower-supernode``s whose
record ids (``P-0001``...), row numbers and image paths collide; a third, unregistered SuperNode
that must be refused. All processes run in their own sessions and are killed at the end, with
whatever they started.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from fairforget.config import APP_DIR
from fairforget.storage import read_json

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b")
BIN = Path(sys.executable).parent
REPLY_TIMEOUT = 15  # seconds the ServerApp waits for a lost node in the node-loss runs
RUN = ('dataset="image-folder" data-root="" num-shards=2 slices=2 epochs-per-slice=1 model-width=4 image-size=8 '
       'batch-size=16 device="cpu" audit-attacks="loss,rmia" audit-references=2 audit-bootstrap=20 '
       'out-dir="{out}"')


# ---------------------------------------------------------------------- fixtures: data
def write_site(root: Path, shade: int) -> list[dict[str, str]]:
    """A site's image folder: ``labels.csv`` (``id,path,label,private,split``) and 40 PNGs. Every site
    numbers its records ``P-0001``.. and its files ``img/0001.png``..: ids, paths and row numbers
    collide across sites. Colour encodes the label (red: benign, blue: malignant); ``shade`` the site."""
    rows = []
    n = 0
    for label, rgb in (("benign", (220, shade, 20)), ("malignant", (20, shade, 220))):
        for private in ("F", "M"):
            for k in range(10):
                n += 1
                rel = f"img/{n:04d}.png"
                (root / "img").mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), rgb if private == "F" else tuple(c // 2 for c in rgb)).save(root / rel)
                split = "train" if k < 6 else "heldout" if k < 8 else "test"
                rows.append({"id": f"P-{n:04d}", "path": rel, "label": label, "private": private, "split": split})
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "path", "label", "private", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


# ---------------------------------------------------------------------- fixtures: processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Flower detaches its SuperExec and app processes in new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill ``proc``, its session and every process it started (by pid), then reap it."""
    pids = _descendants(proc.pid)
    for target in (lambda: os.killpg(proc.pid, sig), *[lambda p=p: os.kill(p, sig) for p in pids]):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


class Federation:
    """A SuperLink with TLS and SuperNode authentication, and one SuperNode per site."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"
        self.logs = root / "logs"
        self.logs.mkdir()
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, int] = {}
        home = root / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "sites"\n\n[superlink.sites]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}

    def data_root(self, site: str) -> Path:
        return self.root / site / "images"

    def state_dir(self, site: str) -> Path:
        return self.root / site / "state"

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def make_certs(self) -> None:
        subprocess.run([sys.executable, str(APP_DIR / "simulations" / "make_certs.py"), "--out", str(self.certs),
                        "--host", "127.0.0.1", *[a for s in (*SITES, "rogue") for a in ("--site", s)]],
                       check=True, capture_output=True, env=self.env)

    def start_superlink(self) -> None:
        c = self.certs
        self._start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile",
            str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
            "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.root / "superlink.db")])
        tls = ssl.create_default_context(cafile=str(c / "ca.crt"))
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", timeout=2, context=tls) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.procs["superlink"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the SuperLink did not start:\n" + self.log("superlink")[-3000:])
            time.sleep(0.3)

    def register(self, site: str) -> int:
        """``flwr supernode register KEY.pub``: the node id the SuperLink gives the site's key."""
        out = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(self.certs / f"{site}.pub"),
                              "--name", site, "--format", "json"],
                             env=self.env, capture_output=True, text=True, timeout=120, check=False)
        reply = json.loads(out.stdout[out.stdout.index("{"):])  # flwr exits 0 with --format json even on failure
        assert reply.get("success"), f"registering {site}: {reply}"
        self.node_ids[site] = int(reply["node-id"])
        return self.node_ids[site]

    def start_supernode(self, site: str, shard: int, key: str | None = None) -> subprocess.Popen:
        node_config = (f'partition-id={shard} site="{site}" data-root="{self.data_root(site)}" '
                       f'state-dir="{self.state_dir(site)}"')
        return self._start(key or site, [
            str(BIN / "flower-supernode"), "--root-certificates", str(self.certs / "ca.crt"),
            "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(self.certs / (key or site)),
            "--host", "127.0.0.1", "--port", str(_free_port()), "--node-config", node_config])

    def stop(self, name: str) -> None:
        _kill(self.procs.pop(name))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def flwr_run(self, run_config: str, background: bool = False):
        argv = [str(BIN / "flwr"), "run", str(APP_DIR), "sites", "--stream", "--run-config", run_config]
        if background:
            return subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=400, check=False)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (lock files aside: they hold no state)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def wire(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "wire.jsonl").read_text().splitlines() if line.strip()]


def status(out: Path) -> dict:
    return read_json(out / "status.json")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """The federation, trained once: ``fed.out`` is the server's run folder (no data-root)."""
    t0 = time.monotonic()
    f = Federation(tmp_path_factory.mktemp("sites"))
    try:
        f.make_certs()
        for site in SITES:
            write_site(f.data_root(site), shade=40 if site == "site-a" else 160)
        f.start_superlink()
        for shard, site in enumerate(SITES):
            f.register(site)
            f.start_supernode(site, shard)
        # a third SuperNode whose key was never registered, claiming site-b's shard
        f.start_supernode("site-b", 1, key="rogue")
        f.out = f.root / "server-run"
        f.train = f.flwr_run(RUN.format(out=f.out))
        f.timings = {"start_and_train": time.monotonic() - t0}
        yield f
    finally:
        f.close()
        print(f"\nfederation timings: {getattr(f, 'timings', {})}")


def _tail(proc) -> str:
    return (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:]


# ---------------------------------------------------------------------- TLS and authentication
def test_superlink_speaks_tls_only(fed):
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{fed.port}/health", timeout=5)
    # and its certificate does not verify against another CA
    other = fed.root / "other-ca"
    subprocess.run([sys.executable, str(APP_DIR / "simulations" / "make_certs.py"), "--out", str(other)],
                   check=True, capture_output=True)
    wrong = ssl.create_default_context(cafile=str(other / "ca.crt"))
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://127.0.0.1:{fed.port}/health", timeout=5, context=wrong)


def test_unregistered_supernode_is_refused(fed):
    rogue = fed.procs["rogue"]
    rc = rogue.wait(timeout=120)
    assert rc != 0
    log = fed.log("rogue")
    assert "Failed to activate SuperNode" in log or "must be registered" in log, log[-2000:]
    # the registered sites are online and the rogue's key is not known to the SuperLink
    listing = subprocess.run([str(BIN / "flwr"), "supernode", "list", "--format", "json"], env=fed.env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
    nodes = json.loads(listing[listing.index("{"):])["nodes"]
    assert {int(n["node-id"]) for n in nodes} == set(fed.node_ids.values()), nodes


# ---------------------------------------------------------------------- training, what travels
def test_training_at_two_sites(fed):
    assert status(fed.out)["ok"], _tail(fed.train)
    # each registered node id is bound to its site's shard (the id Flower derived from its key)
    bound = read_json(fed.out / "nodes.json")["shards"]
    assert {int(k): (int(v["node"]), v["site"]) for k, v in bound.items()} == {
        k: (fed.node_ids[s], s) for k, s in enumerate(SITES)}
    for site in SITES:
        assert (fed.state_dir(site) / "index.json").is_file()
    metrics = read_json(fed.out / "metrics.json")
    assert [s["shard"] for s in metrics["shards"]] == [0, 1]
    assert all(s["num_examples"] == 24 for s in metrics["shards"])  # the split column: 6 of 10 per cell train


def _check_wire(lines: list[dict], node_ids: set[int], echo: dict[str, list[str]]) -> None:
    """No reply carried sample tensors, record ids (other than a deletion reply's echo) or per-group counts."""
    assert lines
    model_shapes = set()
    for line in lines:
        assert line["src_node_id"] in node_ids, line
        assert "error" not in line, line
        kind = line["message_type"]
        for name, rec in line["records"].items():
            if rec["kind"] == "arrays":
                assert kind in ("train", "train.unlearn"), f"{kind} reply carried arrays: {line}"
                model_shapes.add((rec["count"], rec["bytes"]))
                continue
            for key, entry in rec["entries"].items():
                assert "group" not in key and "count" not in key, f"{kind} reply carried {key}: {line}"
                if kind == "train.unlearn" and key in echo:
                    assert entry["len"] == len(echo[key]), line
                    if "value" in entry:
                        assert entry["value"] == echo[key], line
                    continue
                assert "ids" not in key and "records" not in key, f"{kind} reply carried {key}: {line}"
                assert entry["type"] not in ("list",), f"{kind} reply carried a list {key}: {line}"
    assert len(model_shapes) == 1, f"arrays of more than one shape travelled (samples?): {model_shapes}"


def _server_holds_no_ids(out: Path, allowed: set[str]) -> None:
    """No file of the server's run folder names a record id other than the deleted ones, or holds an image."""
    live = {f"P-{n:04d}" for n in range(1, 41)} - allowed
    for p in out.rglob("*"):
        if p.is_file():
            assert p.suffix.lower() not in (".png", ".jpg", ".csv"), p
            data = p.read_bytes()
            leaked = sorted(i for i in live if i.encode() in data)
            assert not leaked, f"{p} names {leaked[:5]}"


def test_training_replies_carry_statistics_only(fed):
    lines = wire(fed.out)
    assert {"train", "query.audit"} <= {line["message_type"] for line in lines}, {l["message_type"] for l in lines}
    _check_wire(lines, set(fed.node_ids.values()), echo={})
    _server_holds_no_ids(fed.out, allowed=set())


# ---------------------------------------------------------------------- deletion at one site
def test_forget_at_one_site_retrains_only_there(fed):
    before = {site: tree_hashes(fed.state_dir(site)) for site in SITES}
    index_b = read_json(fed.state_dir("site-b") / "index.json")
    seen = len(wire(fed.out))
    t0 = time.monotonic()
    res = fed.flwr_run(RUN.format(out=fed.out) + ' mode="forget" forget-site="site-b" forget-records="P-0003"')
    fed.timings["forget"] = time.monotonic() - t0
    assert status(fed.out)["ok"], _tail(res)

    # site-a: every state file byte-identical (P-0003 there is another patient, untouched)
    after_a = tree_hashes(fed.state_dir("site-a"))
    assert {k: after_a.get(k) for k in before["site-a"]} == before["site-a"]
    # site-b: the index moved on, P-0003 deleted and tombstoned at the data's owner
    index_b2 = read_json(fed.state_dir("site-b") / "index.json")
    assert index_b2 != index_b
    assert "P-0003" in json.dumps(index_b2) or "P-0003" in (fed.data_root("site-b") / ".fairforget-tombstones.jsonl"
                                                             ).read_text()
    assert "P-0003" in (fed.data_root("site-b") / ".fairforget-tombstones.jsonl").read_text()
    assert not (fed.data_root("site-a") / ".fairforget-tombstones.jsonl").exists()

    # the ledger: one deletion, at shard 1 (site-b), of that record; nothing pending
    entries = [json.loads(x) for x in (fed.out / "ledger.jsonl").read_text().splitlines() if x.strip()]
    done = [e for e in entries if e.get("phase", "done") != "intent" and "shard" in e]
    assert [(e["shard"], e.get("site", "site-b")) for e in done] == [(1, "site-b")], entries
    assert "P-0003" in json.dumps(done[0])
    assert not status(fed.out).get("pending")

    # only site-b was asked to delete, and its reply echoes the record alone
    new = wire(fed.out)[seen:]
    unlearn = [line for line in new if line["message_type"] == "train.unlearn"]
    assert [line["src_node_id"] for line in unlearn] == [fed.node_ids["site-b"]], new
    assert "query.describe" not in {line["message_type"] for line in new}  # no membership broadcast
    _check_wire(new, set(fed.node_ids.values()), echo={"deleted-records": ["P-0003"], "forget-records": ["P-0003"]})
    _server_holds_no_ids(fed.out, allowed={"P-0003"})

    # an id unknown at its site is refused with nothing changed
    snap = {site: tree_hashes(fed.state_dir(site)) for site in SITES}
    ledger = (fed.out / "ledger.jsonl").read_bytes()
    res = fed.flwr_run(RUN.format(out=fed.out) + ' mode="forget" forget-site="site-b" forget-records="P-9999"')
    st = status(fed.out)
    assert not st["ok"] and "P-9999" in st["error"] and "\n" not in st["error"], st
    assert {site: tree_hashes(fed.state_dir(site)) for site in SITES} == snap
    assert (fed.out / "ledger.jsonl").read_bytes() == ledger


# ---------------------------------------------------------------------- node loss
def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_node_lost_mid_deletion_then_restarted_resumes(fed):
    """Kill site-b's SuperNode as soon as it has committed a deletion (its tombstone is written, the
    retrain not yet reported): the run stops after ``reply-timeout`` with a one-line error and the
    deletion pending; site-a is untouched; the restarted SuperNode (same key, same state folder)
    finishes it on ``forget-records=""`` (resume)."""
    tomb = fed.data_root("site-b") / ".fairforget-tombstones.jsonl"
    before_a = tree_hashes(fed.state_dir("site-a"))
    t0 = time.monotonic()
    run = fed.flwr_run(RUN.format(out=fed.out) + f' mode="forget" forget-site="site-b" forget-records="P-0005" '
                       f'reply-timeout={REPLY_TIMEOUT}', background=True)
    try:
        _wait_for(lambda: tomb.exists() and "P-0005" in tomb.read_text(), 200, "site-b never committed P-0005")
        fed.stop("site-b")  # SIGKILL: the SuperNode, its SuperExec and the ClientApp mid-retrain
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            _kill(run)
    fed.timings["node_loss"] = time.monotonic() - t0
    st = status(fed.out)
    assert not st["ok"], out[-3000:]
    assert st["error"] and "\n" not in st["error"], st["error"]
    assert "P-0005" in json.dumps(st["pending"]), st  # intent without completion: pending, at shard 1
    assert list(st["pending"].values())[0].keys() == {"1"}, st["pending"]
    assert tree_hashes(fed.state_dir("site-a")) == before_a

    # restart site-b with the same key and state folder; resume the unfinished deletion
    fed.start_supernode("site-b", 1)
    t0 = time.monotonic()
    res = fed.flwr_run(RUN.format(out=fed.out) + ' mode="forget" forget-records=""')
    fed.timings["resume"] = time.monotonic() - t0
    st = status(fed.out)
    assert st["ok"], _tail(res)
    assert not st.get("pending"), st
    assert "P-0005" in json.dumps(st["deleted"]), st
    assert tree_hashes(fed.state_dir("site-a")) == before_a
    ledger = fed.out / "ledger.jsonl"
    assert "P-0005" in ledger.read_text()


def test_min_shards_decides_whether_a_run_goes_on_without_a_lost_site(fed):
    """site-b gone for good: with min-shards = all a new run stops with a one-line error naming the
    missing shard; with min-shards = 1 it finishes on site-a alone and its metrics say shard 1 is missing."""
    fed.stop("site-b")
    out = fed.root / "run-without-b"
    t0 = time.monotonic()
    res = fed.flwr_run(RUN.format(out=out) + f" reply-timeout={REPLY_TIMEOUT}")
    st = status(out)
    assert not st["ok"] and "\n" not in st["error"] and "1" in st["error"], _tail(res)
    res = fed.flwr_run(RUN.format(out=out) + f" reply-timeout={REPLY_TIMEOUT} min-shards=1")
    fed.timings["min_shards"] = time.monotonic() - t0
    assert status(out)["ok"], _tail(res)
    metrics = read_json(out / "metrics.json")
    assert 1 in metrics.get("missing_shards", metrics.get("run", {}).get("missing_shards", [])), metrics.keys()
