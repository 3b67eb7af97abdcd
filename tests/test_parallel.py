"""The suite's parallel workers (pytest-xdist, `-n 2 --dist loadgroup` in pyproject.toml): tests that
share a module-scoped fixture run on one worker, which builds it once (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env

INNER = '''
import json, os
from pathlib import Path

import pytest

LOG = Path(__file__).parent / "log.jsonl"


def record(**fields):
    with LOG.open("a") as f:
        f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER"), **fields}) + "\\n")


@pytest.fixture(scope="module")
def built():
    record(event="built")
    return 1


@pytest.mark.parametrize("i", range(6))
def test_shares(built, i):
    record(event="shares", i=i)


@pytest.mark.parametrize("i", range(6))
def test_alone(i):
    record(event="alone", i=i)
'''


@pytest.fixture(scope="module")
def shared_here():
    return object()


def test_pytests_fixture_info_still_holds_scopes(request, shared_here):
    """conftest.pytest_collection_modifyitems reads `item._fixtureinfo` (pytest's, not public)."""
    defs = request.node._fixtureinfo.name2fixturedefs["shared_here"]
    assert defs[-1].scope == "module"


def test_tests_sharing_a_module_fixture_run_on_one_worker_which_builds_it_once(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                           "loadgroup", "-o", "addopts=", "test_inner.py"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12 passed" in proc.stdout
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    built = [r for r in log if r["event"] == "built"]
    assert len(built) == 1  # one worker built it, once
    assert {r["worker"] for r in log if r["event"] == "shares"} == {built[0]["worker"]}
    assert {r["worker"] for r in log} == {"gw0", "gw1"}  # and the rest spread over both workers
