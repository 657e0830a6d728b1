"""The site's record key: made once at the site (mode 0600), never sent; a lost, swapped, torn or
unreadable key is one line naming the file, never a shard whose sample ids silently match nothing."""

from __future__ import annotations

import os

import pytest

from fairforget.data import DatasetError
from fairforget.data.image_folder import record_key, site_key
from fairforget.site_secret import KEY_FILE, SiteSecretError
from server.experiment import run_training
from tests.test_sites import SitesGrid, federation  # noqa: F401 - the in-process two-site federation


def test_the_key_is_the_sites_own_and_its_loss_or_damage_is_one_line(federation):  # noqa: F811
    cfg, sites = federation
    run_training(SitesGrid(cfg, sites), cfg)
    (data_a, _, _), (data_b, _, _) = sites[0], sites[1]
    key_path = data_b / KEY_FILE
    assert key_path.stat().st_mode & 0o777 == 0o600 and len(key_path.read_bytes()) == 32
    assert site_key(data_a) != site_key(data_b)  # two sites, two keys: their P-0001 are unlinkable
    assert record_key("P-0001", site_key(data_a)) != record_key("P-0001", site_key(data_b))
    assert not any(key_path.read_bytes() in p.read_bytes() for p in cfg.out_path.rglob("*") if p.is_file())

    grid = SitesGrid(cfg, sites)
    good = key_path.read_bytes()
    key_path.write_bytes(good[:5])  # torn
    with pytest.raises(DatasetError, match=f"site key {key_path} has 5 bytes, not 32"):
        grid.node(102, 1)
    os.remove(key_path)  # lost: a new key would rename every record; the state folder says so
    from fairforget.data import _load_cached

    _load_cached.cache_clear()
    with pytest.raises(SiteSecretError, match="is not the key state folder .* was made under"):
        grid.node(102, 1)
    key_path.write_bytes(good)
    os.chmod(key_path, 0o600)
    _load_cached.cache_clear()
    assert grid.node(102, 1).shard == 1  # the restored key serves again
