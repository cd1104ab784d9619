"""Coverage-guided fuzzing of the image-reference grammar (`snapcache.images`) with atheris.

Holds: any text parses to a reference or raises `InvalidImageReference` (nothing else), and a
parsed reference's normalized form parses again to itself (a fixed point). Run it longer with
``python tests/fuzz/fuzz_images.py -max_total_time=600 CORPUS_DIR tests/fuzz/seeds/images`` (see
tests/fuzz/README.md).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from snapcache.images import InvalidImageReference, familiar_name, parse_image_reference


def test_one_input(data: bytes) -> None:
    """One input: the reference text is the fuzzer's bytes as UTF-8 (what gRPC and JSON deliver)."""
    text = data.decode("utf-8", "replace")
    try:
        reference = parse_image_reference(text)
    except InvalidImageReference:
        return
    normalized = str(reference)
    again = parse_image_reference(normalized)
    parts = (again.registry, again.repository, again.tag, again.digest)
    if str(again) != normalized or parts != (
        reference.registry,
        reference.repository,
        reference.tag,
        reference.digest,
    ):
        raise AssertionError(f"{text!r} -> {normalized!r} -> {again!s}: not a fixed point")
    familiar_name(reference)


def main() -> None:
    """libFuzzer's command line (``-runs``, ``-max_total_time``, ``-rss_limit_mb``, corpus dirs)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
