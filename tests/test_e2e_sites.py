"""Hospital sites for real, under Flower's deployment engine: TLS, SuperNode authentication, each
site's own image folder and state folder, a server without patient data, deletion at one site,
and node loss. Every command here is one the README's "Deploying across sites" section shows.

One federation for the module (starting it costs more than a tiny run): certificates and keys from
``simulations/make_certs.py``; a ``flower-superlink`` with TLS and ``--enable-supernode-auth``; two
sites' public keys registered with ``flwr supernode register``; two ``flower-supernode``s whose
record ids (``P-0001``...), row numbers and image paths collide, bound to their shards by the
operator's binding file (the registered node ids); a third, unregistered SuperNode that must be
refused; site-c's registered SuperNode claiming site-a's shard and name, which must never be sent
anything; and SuperNodes refused by TLS alone: site-d's (registered key) trusting another CA, site-e's
(registered key) and a keyless one asking for a plaintext connection. All processes run in their own
sessions and are killed at the end, with whatever they started.
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
from fairforget.data.image_folder import record_key, site_key
from fairforget.storage import read_json

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b")
IMPOSTOR = "site-c"  # a registered, authenticated site whose SuperNode claims site-a's shard and name
WRONG_CA = "site-d"  # a registered site whose SuperNode trusts another CA (--root-certificates)
NO_TLS = "site-e"  # a registered site whose SuperNode asks for a plaintext connection (--insecure)
PLAINTEXT = "plaintext"  # a keyless SuperNode with --insecure: its plaintext reaches the SuperLink's port
GIVE_UP = ["--max-retries", "2", "--max-wait-time", "20"]  # a refused SuperNode stops trying within seconds
BIN = Path(sys.executable).parent
REPLY_TIMEOUT = 60  # seconds the node-loss runs wait for a reply: above a ClientApp start on 2 busy cores
# the README's commands with a tiny model; training audits at the sites, the later runs do not (time)
RUN = ('dataset="image-folder" num-shards=2 slices=2 epochs-per-slice=1 model-width=4 image-size=8 batch-size=16 '
       'device="cpu" audit-attacks="loss,rmia" audit-references=2 audit-bootstrap=20 out-dir="{out}" '
       'binding="{{binding}}"')  # the operator's binding file: Federation.flwr_run fills in its path
FORGET = RUN + ' audit=false request="{request}"'  # the request itself is a file in out-dir (fairforget request)


def key_of(fed, site: str, record: str) -> int:
    """The sample id site ``site`` gives its record (a keyed hash under the site's own secret key)."""
    return record_key(record, site_key(fed.data_root(site)))


def file_request(out: Path, *args: str) -> str:
    """``fairforget request --run OUT ARGS`` on the coordinator; the id it printed."""
    import contextlib
    import io

    from server import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["request", "--run", str(out), *args]) == 0
    return buf.getvalue().split("request ", 1)[1].split()[0]



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
        self.binding: Path | None = None  # the operator's binding file (write_binding)
        self.impostor: int | None = None  # site-c's registered node id
        self.tls_refused: dict[str, int] = {}  # site-d's and site-e's registered node ids (never bound)
        self.other_ca = root / "other-ca"  # a CA of the same make, that signed nothing of this federation
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
                        "--host", "127.0.0.1", *[a for s in (*SITES, IMPOSTOR, WRONG_CA, NO_TLS, "rogue")
                                                 for a in ("--site", s)]],
                       check=True, capture_output=True, env=self.env)
        subprocess.run([sys.executable, str(APP_DIR / "simulations" / "make_certs.py"), "--out", str(self.other_ca),
                        "--host", "127.0.0.1"], check=True, capture_output=True, env=self.env)

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

    def write_binding(self) -> Path:
        """The operator's binding file: each site's shard and the node id its key was registered under."""
        self.binding = self.root / "binding.toml"
        self.binding.write_text("".join(
            f'[[site]]\nname = "{site}"\nshard = {shard}\nnode-id = {self.node_ids[site]}\n\n'
            for shard, site in enumerate(SITES)))
        return self.binding

    def start_supernode(self, site: str, shard: int, key: str | None = None, home: str | None = None,
                        tls: list[str] | None = None, name: str | None = None) -> subprocess.Popen:
        """``site``'s SuperNode (``key``: another private key, ``""`` none; ``home``: another site's data
        and state folders: a node whose config claims ``site`` and ``shard`` that are not its own; ``tls``:
        other TLS options than trusting the federation's CA; ``name``: its process and log name)."""
        home = home or site
        node_config = (f'partition-id={shard} site="{site}" data-root="{self.data_root(home)}" '
                       f'state-dir="{self.state_dir(home)}"')
        key = site if key is None else key
        auth = ["--auth-supernode-private-key", str(self.certs / key)] if key else []
        return self._start(name or key, [
            str(BIN / "flower-supernode"), *(tls or ["--root-certificates", str(self.certs / "ca.crt")]),
            "--superlink", f"127.0.0.1:{self.port}", *auth,
            "--host", "127.0.0.1", "--port", str(_free_port()), "--node-config", node_config])

    def stop(self, name: str) -> None:
        _kill(self.procs.pop(name))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def flwr_run(self, run_config: str, background: bool = False):
        run_config = run_config.replace("{binding}", str(self.binding))
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
        f.write_binding()  # from the node ids `flwr supernode register` printed
        # a third SuperNode whose key was never registered, claiming site-b's shard
        f.start_supernode("site-b", 1, key="rogue")
        # refused by TLS alone (test_supernode_trusting_another_ca_is_refused, ..._without_tls_is_refused):
        # site-d and site-e registered (so authentication would let them in) but never bound
        t_tls = time.monotonic()
        for site in (WRONG_CA, NO_TLS):
            f.tls_refused[site] = f.register(site)
            del f.node_ids[site]
        f.start_supernode(WRONG_CA, 0, tls=["--root-certificates", str(f.other_ca / "ca.crt"), *GIVE_UP])
        f.start_supernode(NO_TLS, 0, tls=["--insecure", *GIVE_UP])
        f.start_supernode(PLAINTEXT, 0, key="", tls=["--insecure", *GIVE_UP], name=PLAINTEXT)
        t_tls = time.monotonic() - t_tls
        # site-c: registered (authenticated), its own data, but its SuperNode claims site-a's shard and name
        # (test_a_registered_node_claiming_site_a_gets_nothing, at the end: it must never be sent anything)
        write_site(f.data_root(IMPOSTOR), shade=100)
        f.impostor = f.register(IMPOSTOR)
        del f.node_ids[IMPOSTOR]  # not a site of this federation's binding
        f.start_supernode("site-a", 0, key=IMPOSTOR, home=IMPOSTOR)
        f.out = f.root / "server-run"
        f.train = f.flwr_run(RUN.format(out=f.out))
        f.timings = {"start_and_train": time.monotonic() - t0, "tls_nodes_start": t_tls}
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
    wrong = ssl.create_default_context(cafile=str(fed.other_ca / "ca.crt"))
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
    registered = {*fed.node_ids.values(), fed.impostor, *fed.tls_refused.values()}
    assert {int(n["node-id"]) for n in nodes} == registered, nodes


def _supernode_list(fed) -> dict[int, dict]:
    listing = subprocess.run([str(BIN / "flwr"), "supernode", "list", "--format", "json"], env=fed.env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
    return {int(n["node-id"]): n for n in json.loads(listing[listing.index("{"):])["nodes"]}


def _refused(fed, name: str, *in_log: str) -> str:
    """SuperNode ``name`` gave up (non-zero exit, within its retries) with ``in_log`` in its log: never
    activated (no "SuperNode ID:", which Flower logs once the SuperLink let it in), never sent anything
    (no "Receiving:"), and no reply of the training from it or binding of it. Returns its log."""
    proc = fed.procs[name]
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SuperNode {name} is still running (connected?):\n" + fed.log(name)[-3000:])
    log = fed.log(name)
    assert rc != 0, log[-3000:]
    for text in in_log:
        assert text in log, f"{name}: no {text!r} in its log:\n{log[-3000:]}"
    assert "SuperNode ID:" not in log and "Receiving:" not in log, log[-3000:]
    # the authentication refusal of test_unregistered_supernode_is_refused is not what stopped it
    assert "Failed to activate SuperNode" not in log and "must be registered" not in log, log[-3000:]
    return log


def _never_online_nor_bound(fed, site: str) -> None:
    node = _supernode_list(fed)[fed.tls_refused[site]]
    assert (node["status"], node["online-at"]) == ("registered", "N/A"), node  # registered, never activated
    nodes = read_json(fed.out / "nodes.json")
    assert fed.tls_refused[site] not in {int(v["node"]) for v in nodes["shards"].values()}, nodes
    assert fed.tls_refused[site] not in {x["src_node_id"] for x in wire(fed.out)}


def test_supernode_trusting_another_ca_is_refused(fed):
    """site-d's key is registered, so authentication would let its SuperNode in; it trusts another CA
    (``--root-certificates`` of a second make_certs.py CA): the SuperLink's certificate fails to verify,
    the SuperNode exits (Flower's exit code 305) and never goes online."""
    _refused(fed, WRONG_CA, "CERTIFICATE_VERIFY_FAILED", "could not establish a connection to the SuperLink")
    _never_online_nor_bound(fed, WRONG_CA)


def test_supernode_without_tls_is_refused(fed):
    """``--insecure``. With site-e's registered key, Flower refuses to start it at all (exit code 303:
    authentication needs TLS), so no key crosses the network in clear. A keyless SuperNode is the one
    whose plaintext reaches the SuperLink: its TLS-only port drops it (exit code 305) before any
    authentication could answer (no "must be registered"), and no new node goes online."""
    _refused(fed, NO_TLS, "SuperNode authentication requires a secure TLS connection")
    _never_online_nor_bound(fed, NO_TLS)
    _refused(fed, PLAINTEXT, "Starting insecure channel", "Server disconnected without sending a response",
             "could not establish a connection to the SuperLink")
    online = {k for k, n in _supernode_list(fed).items() if n["online-at"] != "N/A"}
    assert online <= {*fed.node_ids.values(), fed.impostor}, online  # (site-b may be restarted later)


# ---------------------------------------------------------------------- training, what travels
def test_training_at_two_sites(fed):
    assert status(fed.out)["ok"], _tail(fed.train)
    # each registered node id is bound to its site's shard (the id Flower derived from its key)
    nodes = read_json(fed.out / "nodes.json")  # as the operator's binding file says
    assert nodes["source"] == str(fed.binding)
    assert {int(k): (int(v["node"]), v["site"]) for k, v in nodes["shards"].items()} == {
        k: (fed.node_ids[s], s) for k, s in enumerate(SITES)}
    for site in SITES:
        assert (fed.state_dir(site) / "index.json").is_file()
    metrics = read_json(fed.out / "metrics.json")
    assert [s["shard"] for s in metrics["shards"]] == [0, 1]
    assert all(s["num_examples"] == 24 for s in metrics["shards"])  # the split column: 6 of 10 per cell train
    assert {name: ev["n"] for name, ev in metrics["ensemble"].items()}["biased"] == 16  # each site's 8 test rows
    # each site audited its own shard model, on its own data, and sent back ROC statistics only
    privacy = metrics["privacy"]
    assert privacy["audited_at"] == {"shard-0": "site-a", "shard-1": "site-b"}, privacy["audited_at"]
    assert all(0.0 <= r["auc"] <= 1.0 for k in ("shard-0", "shard-1") for r in privacy["targets"][k].values())


RECORDS = [f"P-{n:04d}" for n in range(1, 41)]
DELETION_REPLIES = ("query.describe", "train.unlearn")  # may echo the ids of the records asked about


def _check_wire(lines: list[dict], node_ids: set[int], asked: int = 0) -> None:
    """No reply carried sample tensors, record ids (other than the ``asked`` ones a deletion reply
    echoes) or per-group counts: one line per reply in ``OUT/wire.jsonl``, entry types and lengths."""
    assert lines
    model_shapes = set()
    for line in lines:
        assert line["src_node_id"] in node_ids, line
        assert "error" not in line, line
        kind = line["message_type"]
        for rec in line["records"].values():
            if rec["kind"] == "arrays":
                assert kind in ("train", "train.unlearn"), f"{kind} reply carried arrays: {line}"
                model_shapes.add((rec["count"], rec["bytes"]))
                continue
            for key, entry in rec["entries"].items():
                assert "group" not in key and "count" not in key, f"{kind} reply carried {key}: {line}"
                if entry["type"] == "list":
                    assert kind in DELETION_REPLIES and entry["len"] <= asked, f"{kind} reply carried {key}: {line}"
    assert len(model_shapes) <= 1, f"arrays of more than one shape travelled (samples?): {model_shapes}"


def _server_holds_no_ids(out: Path, sites: list[Path], allowed: set[str]) -> None:
    """No file of the server's run folder is a site's image or labels, or names a live record by its
    id or by its sample id (the hash of its id): only the records asked to be deleted may appear."""
    images = {hashlib.sha256(p.read_bytes()).hexdigest() for root in sites for p in root.rglob("*") if p.is_file()}
    live = [r for r in RECORDS if r not in allowed]
    keys = [site_key(root) for root in sites]
    needles = {r.encode(): r for r in live} | {str(record_key(r, k)).encode(): r for r in live for k in keys}
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert hashlib.sha256(data).hexdigest() not in images, f"{p} is a site's file"
            leaked = sorted({r for n, r in needles.items() if n in data})
            assert not leaked, f"{p} names live records {leaked[:5]}"


def test_training_replies_carry_statistics_only(fed):
    lines = wire(fed.out)
    assert {"query.identify", "train", "query.evaluate", "query.audit"} <= {x["message_type"] for x in lines}
    _check_wire(lines, set(fed.node_ids.values()))
    _server_holds_no_ids(fed.out, [fed.data_root(x) for x in SITES], allowed=set())


# ---------------------------------------------------------------------- deletion at one site
def ledger_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines() if x.strip()]


def test_forget_at_one_site_retrains_only_there(fed):
    before = {site: tree_hashes(fed.state_dir(site)) for site in SITES}
    index_b = (fed.state_dir("site-b") / "index.json").read_bytes()
    seen = len(wire(fed.out))
    t0 = time.monotonic()
    request = file_request(fed.out, "--site", "site-b", "--records", "P-0003")
    run_config = FORGET.format(out=fed.out, request=request)
    assert "P-0003" not in run_config and "site-b" not in run_config  # what every site's ClientApp receives
    res = fed.flwr_run(run_config)
    fed.timings["forget"] = time.monotonic() - t0
    assert status(fed.out)["ok"], _tail(res)

    # site-a: every state file byte-identical (its own P-0003, another patient, untouched)
    assert tree_hashes(fed.state_dir("site-a")) == before["site-a"]
    assert not (fed.data_root("site-a") / ".fairforget-tombstones.jsonl").exists()
    # site-b: the index moved on without the record, tombstoned at the data's owner
    key = key_of(fed, "site-b", "P-0003")
    assert key != key_of(fed, "site-a", "P-0003")  # the same record id at two sites: unlinkable sample ids
    assert (fed.state_dir("site-b") / "index.json").read_bytes() != index_b
    assert str(key) in (fed.data_root("site-b") / ".fairforget-tombstones.jsonl").read_text()
    assert str(key) not in json.dumps(read_json(fed.state_dir("site-b") / "index.json")["slices"])

    # the ledger: one deletion, at shard 1 of site-b, naming the record; nothing pending
    done = [e for e in ledger_lines(fed.out) if e.get("phase") != "intent"]
    assert [(e["shard"], e["site"], e["records"], e["ids"]) for e in done] == [(1, "site-b", ["P-0003"], [key])]
    st = status(fed.out)
    assert st["deleted"] == {"1": {"1": [key]}} and not st["pending"], st
    metrics = read_json(fed.out / "metrics.json")
    hashes = {s["shard"]: s["model_hash"] for s in metrics["shards"]}
    assert done[0]["hash_after"] == hashes[1] != done[0]["hash_before"]

    # only site-b was asked anything about the record; its replies echo that record alone
    new = wire(fed.out)[seen:]
    asked = {x["src_node_id"] for x in new if x["message_type"] in DELETION_REPLIES}
    assert asked == {fed.node_ids["site-b"]}, new
    _check_wire(new, set(fed.node_ids.values()), asked=1)
    _server_holds_no_ids(fed.out, [fed.data_root(x) for x in SITES], allowed={"P-0003"})


# ---------------------------------------------------------------------- node loss
def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_node_lost_mid_deletion_then_restarted_resumes(fed):
    """Kill site-b's SuperNode (SIGKILL, with its SuperExec and ClientApp) the moment it receives its
    ``train.unlearn`` message: the run stops after ``reply-timeout`` with a one-line error and the
    deletion pending at shard 1 (an intent line without completion); neither site's state changed;
    the SuperNode restarted with the same key and state folder finishes it on ``forget-records=""``
    (resume). (A kill after the node's commit is tests/test_crash_safety.py's, in process: with a
    tiny model the retrain is over before a kill could land.)"""
    tomb = fed.data_root("site-b") / ".fairforget-tombstones.jsonl"
    key = key_of(fed, "site-b", "P-0005")
    before = {site: tree_hashes(fed.state_dir(site)) for site in SITES}
    received = fed.log("site-b").count("Receiving: train.unlearn")
    t0 = time.monotonic()
    request = file_request(fed.out, "--site", "site-b", "--records", "P-0005")
    run = fed.flwr_run(FORGET.format(out=fed.out, request=request) + " "
                       f"reply-timeout={REPLY_TIMEOUT}", background=True)
    try:
        _wait_for(lambda: fed.log("site-b").count("Receiving: train.unlearn") > received, 300,
                  "site-b never received its train.unlearn")
        fed.stop("site-b")
        out, _ = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            _kill(run)
    fed.timings["node_loss"] = time.monotonic() - t0
    st = status(fed.out)
    assert not st["ok"], out[-3000:]
    assert st["error"] and "\n" not in st["error"] and "shard" in st["error"], st["error"]
    assert list(st["pending"].values()) == [{"1": [key]}], st
    intent = [e for e in ledger_lines(fed.out) if e.get("phase") == "intent"][-1]
    assert intent["shards"] == {"1": {"decision": "exact-retrain", "ids": [key], "method": "exact-sisa"}}
    assert not [e for e in ledger_lines(fed.out) if e.get("phase") != "intent" and e["request"] == intent["request"]]
    assert {site: tree_hashes(fed.state_dir(site)) for site in SITES} == before
    assert str(key) not in tomb.read_text()

    # restart site-b: same key (so the same node id), same state folder; resume the deletion
    fed.start_supernode("site-b", 1)
    seen = len(wire(fed.out))
    t0 = time.monotonic()
    res = fed.flwr_run(FORGET.format(out=fed.out, request=file_request(fed.out, "--resume")))
    fed.timings["resume"] = time.monotonic() - t0
    st = status(fed.out)
    assert st["ok"], _tail(res)
    # only the pending shard's site is asked about the pending record: site-a has its own P-0005,
    # whose sample id (the hash of "P-0005") is the same, and must not be asked (nor claim it)
    new = wire(fed.out)[seen:]
    asked = {x["src_node_id"] for x in new if x["message_type"] in DELETION_REPLIES}
    assert asked == {fed.node_ids["site-b"]}, new
    assert not st["pending"], st
    assert st["deleted"] == {str(intent["request"]): {"1": [key]}}, st  # the deletion this run finished
    assert tree_hashes(fed.state_dir("site-a")) == before["site-a"]
    assert str(key) in tomb.read_text()
    after = read_json(fed.state_dir("site-b") / "index.json")  # retrained to the end, without the record
    assert str(key) not in json.dumps(after["slices"]) and key in after["deleted"]
    assert after["trained"] == after["target"] == 2
    assert sorted(p.name for p in (fed.state_dir("site-b") / "checkpoints").iterdir()) == ["stage-1.pt", "stage-2.pt"]
    done = [e for e in ledger_lines(fed.out) if e.get("phase") != "intent" and e["request"] == intent["request"]]
    assert [(e["shard"], e["ids"]) for e in done] == [(1, [key])]
    hashes = {s["shard"]: s["model_hash"] for s in read_json(fed.out / "metrics.json")["shards"]}
    assert done[0]["hash_after"] == hashes[1]


def test_min_shards_lets_a_run_finish_without_a_lost_site(fed):
    """site-b gone (its SuperNode killed): a new training with ``min-shards = 1`` waits
    ``reply-timeout`` for it, then finishes on site-a alone; metrics and report name shard 1 missing.
    (With min-shards = all, the default, the run stops instead: the mid-deletion test above.)"""
    if "site-b" in fed.procs:
        fed.stop("site-b")
    out = fed.root / "run-without-b"
    t0 = time.monotonic()
    res = fed.flwr_run(RUN.format(out=out) + f" audit=false reply-timeout={REPLY_TIMEOUT} min-shards=1")
    fed.timings["min_shards"] = time.monotonic() - t0
    assert status(out)["ok"], _tail(res)
    metrics = read_json(out / "metrics.json")
    assert [s["shard"] for s in metrics["shards"]] == [0]
    assert metrics["federation"]["missing"] == [1], metrics["federation"]
    assert "Lost sites" in (out / "report.md").read_text()


# ---------------------------------------------------------------------- a registered node claiming site-a
def test_a_registered_node_claiming_site_a_gets_nothing(fed):
    """site-c's key is registered (its SuperNode is authenticated and online since before the
    training), but its node config claims ``partition-id=0 site="site-a"``, site-a's shard. The binding
    file binds shard 0 to site-a's registered node id, so through the training, the deletions, the
    resume and the run without site-b it was sent nothing (its SuperNode logged no "Receiving:"), no
    reply came from it, and no run bound it. (The same attack while site-a is offline, and replies that
    claim another shard: tests/adversarial/test_binding.py, in process.)"""
    impostor = fed.procs[IMPOSTOR]
    assert impostor.poll() is None, fed.log(IMPOSTOR)[-3000:]  # connected all along, not refused
    log = fed.log(IMPOSTOR)
    assert "Receiving:" not in log, log[-3000:]
    for out in (fed.out, fed.root / "run-without-b"):  # the first training's run folder, and the later one
        if out != fed.out and not (out / "nodes.json").exists():
            continue  # (run alone, without the min-shards test)
        nodes = read_json(out / "nodes.json")
        assert fed.impostor not in {int(v["node"]) for v in nodes["shards"].values()}, nodes
        assert (int(nodes["shards"]["0"]["node"]), nodes["shards"]["0"]["site"]) == (fed.node_ids["site-a"], "site-a")
        assert fed.impostor not in {x["src_node_id"] for x in wire(out)}
    assert not (fed.state_dir(IMPOSTOR) / "index.json").exists()  # it never trained anything
