"""Generate the Python packages of `protos/`; `--check` fails on drift.

Run from anywhere: `python scripts/gen_protos.py [--check]`. The generated modules (messages,
gRPC stubs and their .pyi type stubs) are committed so the package installs without protoc.
Two packages: `snapcache.v1` (snapcache's API) and `snapcache.containerd` (the wire-compatible
subset of containerd's API the node agent calls).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGES = {
    Path("snapcache") / "v1": "Generated from protos/snapcache/v1. Do not edit.",
    Path("snapcache") / "containerd": "Generated from protos/snapcache/containerd (containerd's API). "
    "Do not edit.",
}


def _plugin(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise SystemExit(f"{name} not found: pip install mypy-protobuf")
    return found


def generate(out: Path) -> None:
    """Run protoc for every proto file into ``out`` (which mirrors the repo root)."""
    sources = sorted(
        str(p.relative_to(PROTOS)) for package in PACKAGES for p in (PROTOS / package).glob("*.proto")
    )
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package, doc in PACKAGES.items():
        (out / package / "__init__.py").write_text(f'"""{doc}"""\n')


def _stale(fresh_dir: Path, committed_dir: Path, package: Path) -> list[Path]:
    """Files of ``package`` that differ between a fresh generation and the committed one."""
    fresh_files = {p.name for p in fresh_dir.iterdir() if p.is_file()}
    committed = {p.name for p in committed_dir.iterdir() if p.is_file()} if committed_dir.exists() else set()
    return sorted(
        package / name
        for name in fresh_files | committed
        if name not in fresh_files
        or name not in committed
        or not filecmp.cmp(fresh_dir / name, committed_dir / name, shallow=False)
    )


def main() -> int:
    """Generate in place, or with --check compare a fresh generation to the committed one."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if options.check:
            stale = [n for package in PACKAGES for n in _stale(fresh / package, ROOT / package, package)]
            if stale:
                print("generated code is stale; run: python scripts/gen_protos.py", file=sys.stderr)
                for name in stale:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        for package in PACKAGES:
            committed_dir = ROOT / package
            if committed_dir.exists():
                shutil.rmtree(committed_dir)
            shutil.copytree(fresh / package, committed_dir)
            print(f"generated {len(list(committed_dir.iterdir()))} files into {package}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
