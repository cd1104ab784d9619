"""Shared fixtures: each support module is a pytest plugin so fixtures live beside what they start."""

pytest_plugins = [
    "tests.support.databases",
    "tests.support.kube_cluster",
    "tests.support.oci_fixtures",
    "tests.support.private_postgres",
    "tests.support.registry_harness",
    "tests.support.token_auth",
]
