"""The suite's speed-ups, tested: parallel workers (pytest-xdist, `-n 2 --dist loadgroup` in
pyproject.toml), where tests that share a module-scoped fixture run on one worker, which builds it
once (tests/conftest.py); and test processes forked from a server with torch imported
(tests/zygote.py), which start as a fresh interpreter would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, run_cli

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
    for name in ("conftest.py", "zygote.py"):
        shutil.copy(Path(__file__).with_name(name), tmp_path / name)
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


# -- test processes forked from a warm server (tests/zygote.py) ----------------------------------

PROBE = '''
import atexit, gc, json, os, sys
cycle = []
cycle.append(cycle)
del cycle
print(json.dumps({"gc": [gc.isenabled(), gc.collect() > 0],"argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("PROBE"), "stdin": sys.stdin.read(),
                  "path0": sys.path[0],
                  "fresh": [m for m in ("bifocal", "deepspeed", "transformers", "safetensors") if m in sys.modules],
                  "torch": "torch" in sys.modules, "pid": os.getpid(), "ppid": os.getppid()}))
print("to stderr", file=sys.stderr)
atexit.register(lambda: open("atexit", "w").write("ran"))
if sys.argv[1] == "raise":
    raise ValueError("boom")
if sys.argv[1] == "hang":
    import time
    time.sleep(600)
sys.exit(int(sys.argv[1]))
'''


@pytest.mark.parametrize("zygote", [True, False], ids=["forked", "fresh"])
def test_a_test_process_is_what_a_fresh_interpreter_would_be(tmp_path, monkeypatch, request, zygote):
    """The same observable start for a forked process as for `python SCRIPT`: argv, cwd, its own
    environment, stdin empty, sys.path[0] the script's folder, stdout and stderr in their files,
    bifocal / DeepSpeed / transformers / safetensors not yet imported, the garbage collector on,
    atexit handlers at exit, the exit status."""
    import signal

    import conftest

    if not zygote:
        monkeypatch.setattr(conftest, "ZYGOTE", None)
    elif conftest.ZYGOTE is None:  # the suite runs with BIFOCAL_TEST_ZYGOTE=0: test a server of our own
        from zygote import Zygote

        monkeypatch.setattr(conftest, "ZYGOTE", Zygote(cli_env))
        request.addfinalizer(conftest.ZYGOTE.close)
    script = tmp_path / "probe" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    work = tmp_path / "work"
    work.mkdir()
    env = {**cli_env(), "PROBE": "here"}

    def run(arg: str, timeout: float = 120):
        out, err = tmp_path / f"{arg}.out", tmp_path / f"{arg}.err"
        proc = conftest.start([str(script), arg], work, env, out, err)
        return proc, out, err

    proc, out, err = run("3")
    assert proc.wait(timeout=120) == 3
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(script), "3"] and seen["cwd"] == str(work) and seen["env"] == "here"
    assert seen["stdin"] == "" and seen["path0"] == str(script.parent) and seen["fresh"] == []
    assert seen["pid"] == proc.pid
    assert seen["torch"] == zygote  # what the server imported before the fork (PRELOAD)
    assert seen["gc"] == [True, True]  # the collector runs and frees the process's own garbage
    assert err.read_text() == "to stderr\n"
    assert (work / "atexit").read_text() == "ran"

    proc, out, err = run("raise")
    assert proc.wait(timeout=120) == 1
    assert "Traceback" in err.read_text() and "ValueError: boom" in err.read_text()

    proc, out, err = run("hang")
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL


def test_run_cli_reports_exit_status_and_output_of_the_real_cli(tmp_path):
    proc = run_cli(["config", "trian"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # wrote nothing, and neither did the harness
