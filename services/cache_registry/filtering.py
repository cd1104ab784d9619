"""The List filter: a small, strict subset of AIP-160.

Grammar: ``term (AND term)*`` where a term is ``state = READY``, ``image = "nginx:1.25"`` or
``labels.KEY = "value"``. Values may be quoted. Anything else is INVALID_ARGUMENT naming the
offending term, rather than a silently ignored clause.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.cache_registry.model import CacheState
from snapcache.errors import FieldViolation, InvalidArgument
from snapcache.images import InvalidImageReference, parse_image_reference

_TERM = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_./-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s"]+)\s*')
_AND = re.compile(r"\s+AND\s+")


@dataclass(frozen=True, slots=True)
class CacheFilter:
    """Conditions a cache must all meet."""

    states: frozenset[CacheState] = frozenset()
    image: str = ""  # normalized reference
    labels: tuple[tuple[str, str], ...] = field(default=())


def parse_filter(text: str, *, field_name: str = "filter") -> CacheFilter:
    """Parse ``text``; empty means no condition."""

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(
            reason="INVALID_FILTER",
            message=f"{field_name}: {why}",
            violations=(FieldViolation(field_name, why),),
        )

    if len(text) > 2048:
        raise bad("filter longer than 2048 characters")
    if not text.strip():
        return CacheFilter()
    states: set[CacheState] = set()
    image = ""
    labels: list[tuple[str, str]] = []
    for term in _AND.split(text.strip()):
        match = _TERM.fullmatch(term)
        if not match:
            raise bad(f"cannot parse {term!r}; expected FIELD = VALUE joined by AND")
        key, value = match.group(1), match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if key == "state":
            try:
                states.add(CacheState(value.upper()))
            except ValueError:
                raise bad(
                    f"unknown state {value!r}; one of {', '.join(s.value for s in CacheState)}"
                ) from None
        elif key == "image":
            try:
                image = str(parse_image_reference(value))
            except InvalidImageReference as exc:
                raise bad(f"image {value!r}: {exc}") from None
        elif key.startswith("labels.") and len(key) > len("labels."):
            labels.append((key.removeprefix("labels."), value))
        else:
            raise bad(f"unknown field {key!r}; filterable: state, image, labels.KEY")
    if len(states) > 1:
        # a conjunction of two different states can match nothing; say so instead of answering []
        raise bad("state can be given once (a cache has one state)")
    return CacheFilter(states=frozenset(states), image=image, labels=tuple(labels))
