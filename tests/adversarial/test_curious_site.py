"""An honest-but-curious hospital: site-a runs the ClientApp as it should, but records everything it
is given (every message's records, the run config and its node config) while site-b's patient is
erased. It must learn nothing that names the request: not the record id, not the site that asked,
not the sample id site-b derives from the record (under site-b's secret key), not the method.

(In deployment; in simulation the simulated nodes are not parties, and a request naming sample ids
of the embedded data asks every node which of them it holds.)"""

from __future__ import annotations

import json

from fairforget.data.image_folder import record_key, site_key
from fairforget.requests import Request
from server.app import run_driver
from server.experiment import run_training
from tests.test_sites import SitesGrid, federation  # noqa: F401 - the in-process two-site federation


def _seen(msg) -> str:
    """Everything a ClientApp can read off a message: each record's keys and values (arrays by name)."""
    out = {"type": msg.metadata.message_type}
    for name, record in msg.content.items():
        out[name] = {k: (str(v) if not hasattr(v, "numpy") else f"array{tuple(v.shape)}") for k, v in record.items()}
    return json.dumps(out, sort_keys=True)


class CuriousSites(SitesGrid):
    """Site-a (node 101) writes down whatever reaches it; the handlers themselves are the real ones."""

    def __init__(self, cfg, sites) -> None:
        super().__init__(cfg, sites)
        self.notes: list[str] = []

    def reply(self, msg):
        if msg.metadata.dst_node_id == 101:
            data, state, name = self.sites[0]
            self.notes.append(_seen(msg))
            self.notes.append(json.dumps(self.cfg.to_mapping(), sort_keys=True))  # its run config
            self.notes.append(json.dumps({"data-root": str(data), "state-dir": str(state), "site": name}))
        return super().reply(msg)


def test_a_curious_site_learns_nothing_of_another_sites_deletion(federation):  # noqa: F811
    cfg, sites = federation
    run_training(SitesGrid(cfg, sites), cfg)
    request = Request.forget(site="site-b", records=["P-0007"], options={"unlearn-method": "finetune"})
    request.save(cfg.out_path)  # what `fairforget request` writes on the coordinator
    run_cfg = cfg.replace(request=request.id)  # what Flower hands the ServerApp and every ClientApp
    grid = CuriousSites(run_cfg, sites)
    run_driver(grid, run_cfg, Request.load(cfg.out_path, request.id))
    status = json.loads((cfg.out_path / "requests" / f"{request.id}.status.json").read_text())
    assert status["ok"] and status["deleted"], status  # the deletion happened, at site-b

    sample_id = record_key("P-0007", site_key(sites[1][0]))
    notes = "\n".join(grid.notes)
    assert grid.notes  # site-a did take part in the run (its evaluation, its audit)
    for needle in ("P-0007", str(sample_id), "site-b", "finetune", "forget"):
        assert needle not in notes, f"site-a saw {needle!r}: {[n for n in grid.notes if needle in n][:1]}"
    kinds = {json.loads(n)["type"] for n in grid.notes if n.startswith('{"') and '"type"' in n}
    assert not kinds & {"query.describe", "train.unlearn"}, kinds


def test_the_run_config_every_site_receives_names_no_request(tmp_path, monkeypatch, capsys):
    """What `fairforget forget` hands Flower as the run config (which Flower gives every ClientApp)
    carries the request's random id only: not the ids, not the method; the request itself is a file
    in the run folder (mode 0600), which only the ServerApp reads."""
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget.config import resolve
    from fairforget.data import load_dataset, shard_of
    from server import cli
    from tests.conftest import TINY, InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = resolve({**TINY, "out-dir": str(tmp_path / "run"), "audit": False})
    run_training(InProcessGrid(cfg), cfg)
    victims = shard_of(cfg, load_dataset(cfg))[1].ids[:2].tolist()
    handed: list[str] = []

    def flower(run_cfg, quiet=False):
        handed.append(run_cfg.to_toml())
        raise cli.FlowerRunError("stopped here")

    monkeypatch.setattr(cli, "run_flower", flower)
    cli.main(["forget", "--run", str(cfg.out_path), "--ids", ",".join(map(str, victims)), "--method", "finetune"])
    (toml,) = handed
    import re
    import tomllib

    texts = [str(v) for k, v in tomllib.loads(toml).items() if isinstance(v, str | list) and k != "out-dir"]
    assert not any(re.search(rf"\b{v}\b", t) for v in victims for t in texts), texts  # no id, in no text
    assert "finetune" not in toml and "forget" not in toml, toml
    request = next((cfg.out_path / "requests").glob("*[0-9a-f].json"))
    assert f'request = "{request.stem}"' in toml
    assert json.loads(request.read_text())["ids"] == victims and request.stat().st_mode & 0o777 == 0o600
