"""The image cache's resource name grammar, shared by every wing and the CLI.

`imageCaches/imc-xxxxxxxx`: the registry mints and checks these names, the matcher and the
extender read them from requests and pod annotations. One grammar, so a name one of them
accepts is a name all of them accept.
"""

from __future__ import annotations

import re
from typing import Final

from snapcache.errors import FieldViolation, InvalidArgument

CACHE_NAME_PREFIX: Final = "imageCaches/"
CACHE_ID_PATTERN: Final = re.compile(r"imc-[a-z0-9]{8}")


def parse_cache_name(name: str, *, field: str = "name") -> str:
    """`imageCaches/imc-xxxxxxxx` (or the bare id) -> the id; INVALID_ARGUMENT otherwise."""
    cache_id = name.removeprefix(CACHE_NAME_PREFIX)
    if not CACHE_ID_PATTERN.fullmatch(cache_id):
        raise InvalidArgument(
            reason="INVALID_NAME",
            message=f"{field}: {name!r} is not an image cache name (imageCaches/imc-xxxxxxxx)",
            violations=(
                FieldViolation(field, "must be imageCaches/imc- followed by 8 lowercase letters or digits"),
            ),
        )
    return cache_id


def cache_name(cache_id: str) -> str:
    """The resource name of a cache id."""
    return CACHE_NAME_PREFIX + cache_id
