"""``fairforget inspect --state-dir STATE --data-root ROOT --config RUN.toml`` as a site runs it: a tiny
site (its own image folder and state folder) is trained through the real ClientApp handlers, then the
site scores its own shard. ``STATE/lsi/records.csv`` names the site's own record ids (its ``labels.csv``
ids), ``STATE/lsi/summary.json`` names none and carries the hash of the model the site serves (its
LEACE eraser included); a mislabeled record stands out, two copies of one image score alike; bad input
(no site's state folder, a missing or another site's data root) is one line and a non-zero exit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fairforget import keys
from fairforget.binding import binding_toml
from fairforget.storage import state_hash, torch_load
from server import cli
from server.experiment import run_training
from tests.conftest import TINY, InProcessGrid
from tests.fixtures_formats import CLASS_RGB, write_png

MISLABELED, DUPLICATE, ORIGINAL = "P-MISLABEL", "P-DUP", "P-0020"


def write_site(root: Path, n: int = 40, extra: bool = False) -> list[str]:
    """``root/labels.csv`` and its PNGs: two classes, each image its class colour with a shade of its
    own (no two records alike); ``extra``: a mislabeled record (class 0's colour, label 1) and a copy
    of ORIGINAL's image under another id. The first 8 rows are the test split, the next 8 held out."""
    rows, ids = ["id,path,label,private,split"], []
    for i in range(n):
        label = i % 2
        rgb = tuple(min(255, max(0, c + (i * 5) % 60 - 30)) for c in CLASS_RGB[label])
        write_png(root / f"img/{i}.png", rgb)
        split = "test" if i < 8 else "heldout" if i < 16 else "train"
        rid = f"P-{i:04d}"
        rows.append(f"{rid},img/{i}.png,{label},{(i // 2) % 2},{split}")
        ids.append(rid)
    if extra:
        write_png(root / "img/mislabeled.png", CLASS_RGB[0])
        rows.append(f"{MISLABELED},img/mislabeled.png,1,0,train")
        (root / "img/dup.png").write_bytes((root / "img/20.png").read_bytes())
        rows.append(f"{DUPLICATE},img/dup.png,0,1,train")
        ids += [MISLABELED, DUPLICATE]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return ids


class SitesGrid(InProcessGrid):
    """The in-process grid, each node a site with its own data-root and state-dir."""

    def __init__(self, cfg, sites: dict[int, tuple[Path, Path]]) -> None:
        super().__init__(cfg)
        self.sites = sites

    def node(self, node_id: int, assigned: int | None = None):
        from clients.node import Node

        shard = self.nodes[node_id]
        data, state = self.sites[shard]
        return Node.from_context(self.cfg.to_mapping(), {
            keys.NODE_PARTITION_ID: shard, keys.NODE_SITE: f"site-{shard}",
            keys.NODE_DATA_ROOT: str(data), keys.NODE_STATE_DIR: str(state)}, assigned)


# the site serves its model with a LEACE eraser over the bottleneck (fairforget.erasure): LSI must score that
# model, the one the run serves, not the checkpoint's network without its eraser
RUN = {**TINY, "dataset": "image-folder", "data-root": "", "audit": False, "epochs-per-slice": 3, "eraser": "leace"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Site 0 (with the mislabeled and duplicated records) and site 1, trained; the run config as a TOML
    file the site was given."""
    from clients.testing import set_task_identity
    from fairforget.config import resolve

    set_task_identity()
    tmp = tmp_path_factory.mktemp("inspect-site")
    ids = write_site(tmp / "data-a", n=56, extra=True)
    write_site(tmp / "data-b")
    sites = {0: (tmp / "data-a", tmp / "state-a"), 1: (tmp / "data-b", tmp / "state-b")}
    binding = tmp / "binding.toml"  # the operator's: site-K's node is 101 + K
    binding.write_text(binding_toml([(f"site-{k}", k, 101 + k) for k in sites]))
    run = {**RUN, "out-dir": str(tmp / "server"), "binding": str(binding)}
    cfg = resolve(run)
    run_training(SitesGrid(cfg, sites), cfg)
    toml = tmp / "run.toml"  # the run config the site was given
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run.items()))
    return sites[0][1], sites[0][0], toml, ids, tmp


def _inspect(state: Path, root: Path, toml: Path, *extra: str) -> int:
    return cli.main(["inspect", "--state-dir", str(state), "--data-root", str(root), "--config", str(toml), *extra])


def test_a_site_scores_its_own_records_and_the_summary_names_none(site, capsys):
    state, root, toml, ids, tmp = site
    assert _inspect(state, root, toml) == 0
    out = capsys.readouterr().out
    assert "shard 0:" in out and str(state / "lsi" / "records.csv") in out
    with (state / "lsi" / "records.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    index = json.loads((state / "index.json").read_text())
    live = {i for sl in index["slices"][:index["trained"]] for i in sl} - set(index["deleted"])
    train_ids = [i for k, i in enumerate(ids) if k >= 16]  # the rows marked train
    assert sorted(r["record"] for r in rows) == sorted(train_ids)  # the site's own ids, every live record once
    assert {int(r["sample"]) for r in rows} == live  # beside the node's (keyed) sample ids
    assert all(r["record"] != r["sample"] for r in rows)

    summary_text = (state / "lsi" / "summary.json").read_text()
    summary = json.loads(summary_text)
    assert summary["records"] == len(rows) and sum(summary["histogram_log10"]["counts"]) == len(rows)
    assert set(summary["classes"]) == {"0", "1"} and len(summary["deciles"]) == 9
    assert sum(c["records"] for c in summary["classes"].values()) == len(rows)
    for r in rows:  # no record id and no sample id in what the site may share
        assert r["record"] not in summary_text and r["sample"] not in summary_text
    assert "P-" not in summary_text
    served = state_hash(torch_load(tmp / "server" / "models" / "shard-0.pt"))
    assert summary["model_hash"] == served  # scored under the model the site serves (a site audit uses the scores)

    lsi = {r["record"]: float(r["lsi"]) for r in rows}
    top = sorted(lsi.values())
    assert lsi[MISLABELED] == top[-1]  # the mislabeled record is the most informative
    assert lsi[DUPLICATE] == pytest.approx(lsi[ORIGINAL], rel=1e-4)  # two copies of one image score alike
    decile = {r["record"]: int(r["decile"]) for r in rows}
    assert decile[MISLABELED] == 9


def test_bad_input_is_one_line_and_a_nonzero_exit(site, capsys, tmp_path):
    state, root, toml, _, tmp = site
    not_a_site = tmp_path / "not-a-site"
    not_a_site.mkdir()
    cases = [
        ((not_a_site, root, toml), "not a shard's state folder"),
        ((tmp / "server", root, toml), "not a shard's state folder"),  # the server's run folder is no site's
        ((state, tmp_path / "missing", toml), "missing is not a folder"),  # no data root
        ((state, tmp / "data-b", toml), "live records are not in its data"),  # another site's data root
        ((tmp_path / "nowhere", root, toml), "nowhere is not a folder"),
    ]
    for args, text in cases:
        code = _inspect(*args)
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("fairforget: error:") and text in err, err
    assert cli.main(["inspect", "--state-dir", str(state), "--config", str(toml)]) == cli.EXIT_USAGE
    assert "needs --data-root" in capsys.readouterr().err
    assert not (not_a_site / "lsi").exists() and not (tmp / "server" / "lsi").exists()
