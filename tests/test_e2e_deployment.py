"""The same ServerApp and ClientApp under Flower's deployment engine: a SuperLink and two SuperNodes
as separate processes on loopback (insecure here; sites use TLS and node authentication), each node
with its own state folder, trained and then asked to forget through `flwr run`."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fairforget.config import APP_DIR
from fairforget.ledger import Ledger
from fairforget.storage import read_json

pytestmark = pytest.mark.e2e

RUN = 'num-shards=2 slices=2 epochs-per-slice=1 model-width=4 image-size=8 device="cpu" out-dir="{out}"'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"SuperLink on port {port} not healthy after {timeout}s")


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture
def federation(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sites"\n\n[superlink.sites]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    procs = [subprocess.Popen(
        [_bin("flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
         "--port", str(link), "--database", str(tmp_path / "link.db")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    _wait_healthy(link)
    for k in range(2):
        node_cfg = f'partition-id={k} num-partitions=2 state-dir="{tmp_path / f"site{k}"}"'
        procs.append(subprocess.Popen(
            [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
             "--port", str(_free_port()), "--health-server-address", f"127.0.0.1:{_free_port()}",
             "--node-config", node_cfg],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    yield env, tmp_path  # the strategy waits until both SuperNodes have connected
    for p in procs:
        try:
            os.killpg(p.pid, 15)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=30)


def _flwr_run(env, run_config: str) -> subprocess.CompletedProcess:
    return subprocess.run([_bin("flwr"), "run", str(APP_DIR), "sites", "--stream", "--run-config", run_config],
                          env=env, capture_output=True, text=True, timeout=400, check=False)


def test_train_and_forget_on_separate_supernodes(federation):
    env, tmp = federation
    out = tmp / "server-run"
    train = _flwr_run(env, RUN.format(out=out))
    assert read_json(out / "status.json")["ok"], train.stdout[-3000:] + train.stderr[-3000:]
    assert (tmp / "site0" / "index.json").is_file() and (tmp / "site1" / "index.json").is_file()
    site1 = read_json(tmp / "site1" / "index.json")
    victim = site1["slices"][0][0]

    forget = _flwr_run(env, RUN.format(out=out) + f' mode="forget" forget-ids="{victim}"')
    assert read_json(out / "status.json")["ok"], forget.stdout[-3000:] + forget.stderr[-3000:]
    assert [(e["shard"], e["ids"]) for e in Ledger(out / "ledger.jsonl").entries()] == [(1, [victim])]
    assert read_json(out / "status.json")["deleted"] == {"1": {"1": [victim]}}
    assert victim in read_json(tmp / "site1" / "index.json")["deleted"]
    assert read_json(tmp / "site0" / "index.json")["deleted"] == []
    # each SuperNode audited its own shard model on its own data and sent back ROC statistics only
    privacy = read_json(out / "metrics.json")["privacy"]
    assert set(privacy["sites"]) == {"site-0", "site-1"}
    assert {t: w for t, w in privacy["audited_at"].items() if t != "ensemble"} == {"shard-0": "site-0",
                                                                                    "shard-1": "site-1"}
    assert all(0.0 <= r["auc"] <= 1.0 for t in ("shard-0", "shard-1") for r in privacy["targets"][t].values())
