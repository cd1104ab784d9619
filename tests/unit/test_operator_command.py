"""`snapcache operator`'s command line: Kubernetes access is required, one way, and bad input exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapcache_cli.main import main


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SNAPCACHE_KUBECONFIG", "SNAPCACHE_KUBE_IN_CLUSTER", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the operator needs Kubernetes access: give --kubeconfig PATH or --in-cluster"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], "kubeconfig /nonexistent/kubeconfig is not a file"),
        (["--in-cluster"], "cannot use the in-cluster Kubernetes configuration"),
        (["--kubeconfig", "/etc/hostname", "--in-cluster"], "not allowed with argument"),
    ],
)
def test_bad_kubernetes_access_exits_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["operator", "--registry", "127.0.0.1:1", *args]) == 2
    assert message in capsys.readouterr().err


def test_an_unusable_kubeconfig_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    assert main(["operator", "--kubeconfig", str(kubeconfig)]) == 2
    assert f"invalid configuration: cannot use kubeconfig {kubeconfig}" in capsys.readouterr().err


def test_the_environment_gives_kubernetes_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SNAPCACHE_KUBECONFIG", str(tmp_path / "missing"))
    assert main(["operator"]) == 2
    assert f"kubeconfig {tmp_path / 'missing'} is not a file" in capsys.readouterr().err
