"""The atheris harnesses of tests/fuzz, each run in a subprocess for a few seconds.

Coverage-guided fuzzing (libFuzzer through atheris) of the three parsers that take input from
outside: image references, page tokens and the extender's JSON body. Bounded for CI: at most
``RUNS`` inputs or ``SECONDS`` seconds each, ``-rss_limit_mb`` so unbounded memory is a failure,
``-timeout`` so a hang is one, a fixed seed so a failure here reproduces. A crash (any exception
the harness does not expect, a broken invariant, the memory or time limit) fails the test and
names the input libFuzzer wrote. New inputs go to a corpus in the test's tmp directory; the seeds
in the repository are only read. Longer runs: tests/fuzz/README.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parents[1] / "fuzz"
FIXTURES = Path(__file__).parents[1] / "fixtures"
RUNS = 200_000
SECONDS = 5
RSS_LIMIT_MB = 1024

HARNESSES = {
    "images": (FUZZ / "seeds" / "images", FUZZ / "images.dict", 4096),
    "page_tokens": (FUZZ / "seeds" / "page_tokens", FUZZ / "page_tokens.dict", 4096),
    "extender_json": (FIXTURES / "extender", FUZZ / "extender_json.dict", 32768),
}


def test_atheris_is_installed() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.fail("atheris is not installed: pip install -e '.[dev]' (x86_64 wheels)", pytrace=False)


@pytest.mark.parametrize("name", list(HARNESSES))
def test_harness_runs_clean(name: str, tmp_path: Path) -> None:
    seeds, dictionary, max_len = HARNESSES[name]
    assert any(seeds.iterdir()), f"no seeds in {seeds}"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [
        sys.executable,
        str(FUZZ / f"fuzz_{name}.py"),
        f"-runs={RUNS}",
        f"-max_total_time={SECONDS}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={max_len}",
        "-timeout=10",
        "-seed=1",
        f"-artifact_prefix={tmp_path}/",
        *([f"-dict={dictionary}"] if dictionary else []),
        str(corpus),
        str(seeds),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS + 60)
    output = result.stdout + result.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-")))
    assert result.returncode == 0 and not crashes, f"{name}: {crashes}\n{output[-4000:]}"
    assert "Done " in output, output[-2000:]
    assert any(corpus.iterdir()), "the fuzzer kept no input: it did not run"
