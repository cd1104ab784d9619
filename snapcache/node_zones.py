"""A node's zone from its labels: the GA topology label, else the beta one older clusters still set.

On the ground floor because the extender (zones of candidate nodes) and the node agent (its own
node's zone, where its disks are provisioned) must read a node's zone the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

ZONE_LABEL: Final = "topology.kubernetes.io/zone"
BETA_ZONE_LABEL: Final = "failure-domain.beta.kubernetes.io/zone"


def zone_of(labels: Mapping[str, str] | None) -> str | None:
    """The node's zone, or None when it has neither label (an empty value counts as none)."""
    if not labels:
        return None
    return labels.get(ZONE_LABEL) or labels.get(BETA_ZONE_LABEL) or None
