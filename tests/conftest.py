"""Shared fixtures: each support module is a pytest plugin so fixtures live beside what they start."""

pytest_plugins = [
    "tests.support.databases",
    "tests.support.registry_harness",
]

import importlib.util as _u
if _u.find_spec("tests.support.oci_fixtures"):
    pytest_plugins.append("tests.support.oci_fixtures")  # TEMP until it lands
