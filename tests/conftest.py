"""Shared fixtures: tiny run configs and an in-process Grid that delivers messages to the real
ClientApp handlers (:mod:`clients.testing`), so strategies and drivers are tested without Ray or a network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clients.testing import TINY, InProcessGrid, set_task_identity
from fairforget.config import RunConfig, parse_ids, resolve
from fairforget.requests import Request, parse_records

__all__ = ["TINY", "InProcessGrid", "forget_request"]  # tests import these from here

# ``make test`` runs ``pytest -n 2 --dist loadfile``: each file runs whole on one xdist worker, so a
# module-scoped fixture (a trained model, a federation) is built once. (``--dist loadgroup`` does not
# group here: pytest-xdist 3.8 appends the group to ``item._nodeid`` and under pytest 9.2
# ``item.nodeid`` does not show it, so every test was scheduled alone.)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Flower's Message needs a run and node identity; the server is node 0 of run 1."""
    set_task_identity()


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    def make(**overrides: Any) -> RunConfig:
        values = {**TINY, "out-dir": str(tmp_path / "run"), **overrides}
        return resolve(values)

    return make


@pytest.fixture
def grid_for():
    return InProcessGrid


def forget_request(ids: str | list[int] = "", *, site: str = "", records: str = "", **options: Any) -> Request:
    """A deletion request as the CLI writes it (``ids`` as on its command line; no ids and no records:
    finish the unfinished deletions)."""
    return Request.forget(parse_ids(ids) if isinstance(ids, str) else list(ids), site=site,
                          records=parse_records(records), options=options)
