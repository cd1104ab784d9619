"""Writes containerd's ``<config_path>/<registry>/hosts.toml`` files (the text: ``hosts_toml``).

Each file is replaced atomically (written beside, then renamed: containerd reads these files on
every pull, without a restart, and must never see half a file). A ``hosts.toml`` the agent did not
write (an administrator's own mirror set-up) is left alone and logged: the agent adds itself to
containerd's configuration, it does not take it over.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from services.node_agent.hosts_toml import MARKER

log = logging.getLogger(__name__)


def write_hosts_files(directory: Path, files: Mapping[str, str]) -> list[str]:
    """Write ``{registry: text}`` under ``directory``; return the registries written."""
    written: list[str] = []
    for registry, text in files.items():
        folder = directory / registry
        target = folder / "hosts.toml"
        try:
            current = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        except OSError as exc:
            log.warning("cannot read %s (%s); leaving it", target, exc)
            continue
        if current == text:
            continue
        if current is not None and not current.startswith(MARKER):
            log.warning("%s was not written by snapcache; leaving it (no mirror for %s)", target, registry)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / ".hosts.toml.snapcache-tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
        written.append(registry)
    return written
