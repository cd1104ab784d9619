"""Private images on disks: served only to a client the image's registry lets pull them; verdicts cached."""

from __future__ import annotations

from services.node_agent.pull_authority import PullAuthority
from snapcache.images import parse_image_reference

PRIVATE = parse_image_reference("registry.example:5000/team/app:1.0")
PUBLIC = parse_image_reference("registry.example:5000/team/public:1.0")
GOOD, BAD = "Basic Z29vZA==", "Basic YmFk"


class Registry:
    """The registry's answer to HEAD with an Authorization: only GOOD may pull."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []

    def __call__(self, registry: str, path: str, authorization: str) -> bool:
        self.asked.append((registry, path, authorization))
        return authorization == GOOD


def test_public_repositories_need_no_check_and_private_ones_need_credentials() -> None:
    registry = Registry()
    authority = PullAuthority(registry)
    authority.set_private({PRIVATE.name})
    assert authority.allows(PUBLIC, "team/public/manifests/1.0", "")
    assert not authority.allows(PRIVATE, "team/app/manifests/1.0", "")  # no credentials: refused unasked
    assert registry.asked == []
    assert authority.allows(PRIVATE, "team/app/manifests/1.0", GOOD)
    assert not authority.allows(PRIVATE, "team/app/manifests/1.0", BAD)
    assert registry.asked == [
        ("registry.example:5000", "team/app/manifests/1.0", GOOD),
        ("registry.example:5000", "team/app/manifests/1.0", BAD),
    ]


def test_verdicts_are_cached_per_credential_and_repository_for_their_time() -> None:
    registry = Registry()
    clock = [0.0]
    authority = PullAuthority(registry, allow_seconds=60, refuse_seconds=5, clock=lambda: clock[0])
    authority.set_private({PRIVATE.name})
    for blob in ("sha256:" + "a" * 64, "sha256:" + "b" * 64):  # a pull's blobs: one check
        assert authority.allows(PRIVATE, f"team/app/blobs/{blob}", GOOD)
    assert not authority.allows(PRIVATE, "team/app/manifests/1.0", BAD)
    assert not authority.allows(PRIVATE, "team/app/manifests/1.0", BAD)
    assert len(registry.asked) == 2
    clock[0] = 6.0  # the refusal expired, the permission not yet
    assert not authority.allows(PRIVATE, "team/app/manifests/1.0", BAD)
    assert authority.allows(PRIVATE, "team/app/manifests/1.0", GOOD)
    assert len(registry.asked) == 3
    clock[0] = 61.0
    assert authority.allows(PRIVATE, "team/app/manifests/1.0", GOOD)
    assert len(registry.asked) == 4


def test_a_repository_no_longer_private_is_served_freely() -> None:
    authority = PullAuthority(Registry())
    authority.set_private({PRIVATE.name})
    assert not authority.allows(PRIVATE, "team/app/manifests/1.0", "")
    authority.set_private(())
    assert authority.allows(PRIVATE, "team/app/manifests/1.0", "")
