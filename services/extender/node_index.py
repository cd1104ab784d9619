"""Node name -> zone, held as a one-byte zone id per name so a request's names are placed in C.

Why this shape: with `nodeCacheCapable` the scheduler sends thousands of node names on every
call, and scheduling is serial, so whatever the extender does per name is added to every pod's
scheduling time. A name's zone id is a small integer; the ids of a request's names are one
``bytes(map(dict.get, names))``, the zones present are ``in`` tests on those bytes, and the names
of the zones that get one score are one ``compress`` over a translated copy of them. No Python
code runs per name, and scores are worked out per zone (a handful), not per node. What is left
per name is decoding it and one dict look-up (a hash and a string compare): callgrind counts
7.1 M instructions for a prioritize call over 5,000 names (matcher stubbed, HTTP aside), against
11.6 M before the index.

Id 0 is "no zone" (and unknown names); zones get ids 1-254 as they are first seen and keep them
until the index is rebuilt (the node cache builds a new one on every relist). A cluster with more
distinct zones than that (none exists) still answers every look-up: the names of zones without
an id are kept aside and `locate` places such requests name by name.

One writer (the node cache's thread) and many readers (request threads): a reader sees each
name's entry either before or after a change, never half of one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import compress, repeat
from typing import Final

NO_ZONE: Final = 0
_OVERFLOW: Final = 255  # a zone beyond the 254 ids: its name is kept in `_overflow`
_MAX_ID: Final = 254
# Characters of node names (DNS subdomains) that need no escaping inside a JSON string.
PLAIN_NAME_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:"


def needs_escaping(name: str) -> bool:
    """True when ``name`` cannot be written between JSON quotes as it is."""
    return bool(name.encode().translate(None, PLAIN_NAME_CHARS))


class NodeIndex(Mapping[str, str | None]):
    """The cluster's nodes and their zones (None: no zone), as the node cache last saw them."""

    def __init__(self, zones: Mapping[str, str | None] | None = None) -> None:
        self._ids: dict[str, int] = {}
        self._zone_names: list[str | None] = [None]  # by id
        self._zone_ids: dict[str, int] = {}
        self._counts: list[int] = [0] * 256  # nodes by zone id
        self._overflow: dict[str, str] = {}
        self._escaped: set[str] = set()  # names that need JSON escaping (Kubernetes allows none)
        self._id_bytes = [bytes((i,)) for i in range(256)]
        self._write = threading.Lock()
        for name, zone in (zones or {}).items():
            self.set(name, zone)

    # --- Mapping: name -> zone ----------------------------------------------------------------

    def __getitem__(self, name: str) -> str | None:
        zone_id = self._ids[name]
        if zone_id == _OVERFLOW:
            return self._overflow.get(name)
        return self._zone_names[zone_id]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        """The node's zone; ``default`` for a node not known (None for one without a zone)."""
        zone_id = self._ids.get(name)
        if zone_id is None:
            return default
        if zone_id == _OVERFLOW:
            return self._overflow.get(name)
        return self._zone_names[zone_id]

    # --- the writer ----------------------------------------------------------------------------

    def set(self, name: str, zone: str | None) -> None:
        """Record (or change) a node's zone."""
        with self._write:
            zone_id = self._zone_id(zone) if zone else NO_ZONE
            if zone_id == _OVERFLOW:
                self._overflow[name] = zone or ""
            old = self._ids.get(name)
            self._ids[name] = zone_id
            self._counts[zone_id] += 1
            if old is not None:
                self._counts[old] -= 1
            if old == _OVERFLOW and zone_id != _OVERFLOW:
                self._overflow.pop(name, None)
            if needs_escaping(name):
                self._escaped.add(name)

    def remove(self, name: str) -> None:
        """Forget a node."""
        with self._write:
            old = self._ids.pop(name, None)
            if old is None:
                return
            self._counts[old] -= 1
            self._overflow.pop(name, None)
            self._escaped.discard(name)

    def _zone_id(self, zone: str) -> int:
        zone_id = self._zone_ids.get(zone)
        if zone_id is None:
            if len(self._zone_names) > _MAX_ID:
                return _OVERFLOW
            zone_id = len(self._zone_names)
            self._zone_names.append(zone)
            self._zone_ids[zone] = zone_id
        return zone_id

    # --- readers -------------------------------------------------------------------------------

    def locate(self, names: Sequence[str]) -> PlacedNodes:
        """The zones of ``names`` (strings), ready to be grouped by zone."""
        ids = bytes(map(self._ids.get, names, repeat(NO_ZONE)))
        if self._id_bytes[_OVERFLOW] in ids:
            return PlacedNodes.name_by_name(names, list(map(self.get, names)))
        present = [
            zone_id
            for zone_id in range(1, len(self._zone_names))
            if self._counts[zone_id] > 0 and self._id_bytes[zone_id] in ids
        ]
        plain = not self._escaped or self._escaped.isdisjoint(names)
        return PlacedNodes(self, names, ids, present, plain=plain)

    def names_in(self, names: Sequence[str], ids: bytes, zone_ids: Iterable[int]) -> list[str]:
        """The names among ``names`` (with their ``ids``) in any of ``zone_ids``, in order."""
        table = bytearray(256)
        for zone_id in zone_ids:
            table[zone_id] = 1
        return list(compress(names, ids.translate(table)))

    def zone_id(self, zone: str) -> int:
        """The id of a zone in use."""
        return self._zone_ids[zone]

    def zone_name(self, zone_id: int) -> str:
        """The zone of an id in use."""
        zone = self._zone_names[zone_id]
        assert zone is not None
        return zone


class PlacedNodes:
    """A request's node names with their zones: the zones present and each zone's names."""

    def __init__(
        self,
        index: NodeIndex | None,
        names: Sequence[str],
        ids: bytes,
        present: Sequence[int],
        *,
        plain: bool,
        groups: dict[str, list[str]] | None = None,
        zone_list: list[str | None] | None = None,
    ) -> None:
        self._index = index
        self.names = names
        self._ids = ids
        self._present = present
        self.plain = plain  # every name may be written between JSON quotes as it is
        self._groups = groups
        self._zone_list = zone_list
        if index is not None:
            self.zones: tuple[str, ...] = tuple(sorted(index.zone_name(i) for i in present))
        else:
            assert groups is not None
            self.zones = tuple(sorted(groups))

    @classmethod
    def name_by_name(cls, names: Sequence[str], zones: Sequence[str | None]) -> PlacedNodes:
        """Placed from a zone per name (the slow way: tests, full-Nodes requests)."""
        groups: dict[str, list[str]] = {}
        for name, zone in zip(names, zones, strict=True):
            if zone:
                groups.setdefault(zone, []).append(name)
        plain = not any(map(needs_escaping, names))
        return cls(None, names, b"", (), plain=plain, groups=groups, zone_list=list(zones))

    def groups(self) -> dict[str, list[str]]:
        """Each present zone's names, in request order (zone-less and unknown names in none)."""
        if self._groups is None:
            index = self._index
            assert index is not None
            self._groups = {
                index.zone_name(zone_id): index.names_in(self.names, self._ids, (zone_id,))
                for zone_id in self._present
            }
        return self._groups

    def scored(self, scores: Mapping[str | None, int]) -> list[tuple[int, list[str]]]:
        """(score, names) for each score above 0 that ``scores`` (by zone) gives, highest first.

        One pass over the names per distinct score, not per zone: zones that score alike (every
        zone where the best cache is AVAILABLE) are picked out together.
        """
        by_score: dict[int, list[str]] = {}
        for zone in self.zones:
            score = scores.get(zone, 0)
            if score > 0:
                by_score.setdefault(score, []).append(zone)
        found = []
        for score in sorted(by_score, reverse=True):
            zones = by_score[score]
            if self._index is not None:
                zone_ids = [self._index.zone_id(zone) for zone in zones]
                found.append((score, self._index.names_in(self.names, self._ids, zone_ids)))
            else:
                wanted = set(zones)
                found.append(
                    (score, [n for n, z in zip(self.names, self.zone_list(), strict=True) if z in wanted])
                )
        return found

    def zone_list(self) -> list[str | None]:
        """Each name's zone, in request order (None: no zone or unknown)."""
        if self._zone_list is None:
            index = self._index
            assert index is not None
            self._zone_list = list(map(index.get, self.names))
        return self._zone_list
