"""`snapcache serve` options that reach the registry's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapcache_cli.main import build_parser
from snapcache_cli.serve import registry_config


def test_instance_id_comes_from_the_flag(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--instance-id", "registry-a"])
    assert registry_config(args).instance_id == "registry-a"


def test_instance_id_defaults_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPCACHE_INSTANCE_ID", "from-env")
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert registry_config(args).instance_id == "from-env"


def test_without_an_instance_id_the_registry_derives_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SNAPCACHE_INSTANCE_ID", raising=False)
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert registry_config(args).instance_id == ""  # RegistryApp then uses host name + data dir
