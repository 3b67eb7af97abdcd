"""Logging (core/logs.py): the README's switches, rank awareness in a real 2-rank run, --quiet
against warnings and errors, and the progress helper with and without a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from bifocal.core import logs
from bifocal.launcher.cli import main as cli

from conftest import cli_env, free_port, run_cli


@pytest.fixture(autouse=True)
def default_logging(monkeypatch):
    for key in (logs.LEVEL_ENV, logs.RANKS_ENV, "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    yield
    logs.setup("info", "0")  # in-process commands below change the settings: put the defaults back


def prepare(args: list[str], capsys) -> tuple[int, str, str]:
    """`bifocal ARGS prepare TINY` in this process (the data is prepared: it says it reuses it)."""
    code = cli(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("switches,env,shown", [
    ([], {}, {"info"}),
    (["--quiet"], {}, set()),
    (["-q"], {}, set()),
    (["-v"], {}, {"info", "debug"}),
    ([], {logs.LEVEL_ENV: "warning"}, set()),
    (["--verbose"], {}, {"info", "debug"}),
    (["--log-level", "debug"], {logs.LEVEL_ENV: "error"}, {"info", "debug"}),  # a flag wins over the variable
    ([], {"RANK": "1", "WORLD_SIZE": "2"}, set()),  # rank 1 is silent by default
    (["--log-ranks", "all"], {"RANK": "1", "WORLD_SIZE": "2"}, {"info", "rank1"}),
    (["--log-ranks", "0,1"], {"RANK": "1", "WORLD_SIZE": "2"}, {"info", "rank1"}),
    ([], {logs.RANKS_ENV: "all", "RANK": "1", "WORLD_SIZE": "2"}, {"info", "rank1"}),
    (["--log-ranks", "0"], {logs.RANKS_ENV: "all", "RANK": "1", "WORLD_SIZE": "2"}, set()),
    ([], {"RANK": "0", "WORLD_SIZE": "2"}, {"info", "rank0"}),
])
def test_documented_switches(tiny_config, capsys, monkeypatch, switches, env, shown):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = prepare([*switches, "prepare", str(tiny_config)], capsys)
    assert code == 0, err
    assert out.startswith("bifocal: prepared data in")  # the command's output, whatever the log settings
    prefix = f"[rank{env['RANK']}]: " if env.get("WORLD_SIZE") == "2" else ""
    lines = err.splitlines()
    assert ("info" in shown) == (f"{prefix}bifocal: {tiny_config.parent / 'prepared'} is already prepared from the "
                                 f"same config and inputs; reusing it" in lines), err
    assert ("debug" in shown) == any(x.startswith(f"{prefix}bifocal: debug: ") and "fingerprint" in x for x in lines)
    assert all(x.startswith(prefix + "bifocal: ") for x in lines), err  # every line carries the prefix
    if not shown:
        assert err == ""


@pytest.mark.parametrize("switches,env,message", [
    (["--log-ranks", "two"], {}, "bifocal: error: --log-ranks 'two': `all` or comma-separated rank numbers, e.g. 0,1"),
    ([], {logs.RANKS_ENV: "-1"}, "bifocal: error: BIFOCAL_LOG_RANKS '-1': `all` or comma-separated rank numbers"),
    ([], {logs.LEVEL_ENV: "loud"}, "bifocal: error: BIFOCAL_LOG_LEVEL 'loud': one of debug, info, warning, error"),
])
def test_bad_settings_are_one_error_line(tiny_config, capsys, monkeypatch, switches, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = prepare([*switches, "prepare", str(tiny_config)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith(message), err


def test_quiet_keeps_warnings_errors_and_output(tiny_config, tmp_path):
    """A real training run under --quiet: no info lines (steps, validation), the warning of a skipped
    step and the run's summary on stdout stay; a bad config is still its one error line."""
    proc = run_cli(["--quiet", "train", "--config", str(tiny_config), "--run-dir", str(tmp_path / "q"), "--set",
                    "train.max_steps=3", "optim.lr=1e30", "optim.warmup_steps=0", "train.on_nan=skip"], tmp_path)
    ours = [x for x in proc.stderr.splitlines() if x.startswith("bifocal:")]
    assert ours and all(x.startswith("bifocal: warning: non-finite loss at step") for x in ours), proc.stderr
    assert "finished at step 3" in proc.stdout
    loud = run_cli(["train", "--config", str(tiny_config), "--run-dir", str(tmp_path / "l"), "--set",
                    "train.max_steps=3", "optim.lr=1e30", "optim.warmup_steps=0", "train.on_nan=skip"], tmp_path)
    assert "bifocal: step 2/3: loss" in loud.stderr and "bifocal: warning: non-finite" in loud.stderr  # the control
    bad = run_cli(["--quiet", "train", "--set", "train.max_step=3"], tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("bifocal: error: ") and "max_steps" in bad.stderr


def test_two_ranks_log_on_rank_0_unless_asked(tiny_config, tmp_path):
    """A real 2-rank run (DeepSpeed's launcher, gloo): by default only rank 0 logs, each line
    prefixed [rank0]:; with `bifocal --log-ranks all launch` both ranks log, and the setting
    reaches the ranks on the launcher's command line (so on every node)."""
    def launch(name: str, *switches: str):
        return run_cli([*switches, "launch", "--num_gpus", "2", "--master_port", str(free_port()), "--", "--config",
                        str(tiny_config), "--run-dir", str(tmp_path / name), "--set", "train.max_steps=2",
                        "train.micro_batch=2", "train.eval_every=2"], tmp_path)

    def ranks_lines(proc) -> list[str]:
        return [x for x in proc.stderr.splitlines() if x.startswith("[rank")]

    quiet_ranks = launch("default")
    lines = ranks_lines(quiet_ranks)
    assert lines and all(x.startswith("[rank0]: bifocal: ") for x in lines), quiet_ranks.stderr[-2000:]
    assert any(x.startswith("[rank0]: bifocal: step 2/2: validation loss ") for x in lines)
    assert not any("bifocal: step" in x and not x.startswith("[rank0]") for x in quiet_ranks.stderr.splitlines())
    both = launch("all", "--log-ranks", "all")
    lines = ranks_lines(both)
    for rank in (0, 1):
        for what in ("step 2/2: loss ", "step 2/2: validation loss "):
            assert any(x.startswith(f"[rank{rank}]: bifocal: {what}") for x in lines), both.stderr[-2000:]
    assert "--module bifocal.launcher.cli --log-ranks all train" in both.stderr


def test_progress_without_a_terminal_is_plain_lines(capsys):
    log = logs.get_logger("bifocal.eval.some_module")
    assert log.name == "bifocal.eval"
    bar = logs.progress(range(20), desc="items", unit="docs", log=log)
    assert bar.plain and list(bar) == list(range(20))  # pytest's stderr is no terminal
    with logs.progress(total=None, desc="tokenizing", unit="B", unit_scale=True, log=log) as sized:
        sized.update(12_345_678)
    with logs.progress(total=4, desc="quiet", log=log, disable=True) as off:
        off.update(4)
    err = capsys.readouterr().err
    assert err.splitlines() == [f"bifocal: items: {n}/20 docs" for n in range(2, 21, 2)] + ["bifocal: tokenizing: 12.3MB"]
    assert "\r" not in err and "\x1b" not in err


def run_on_terminal(code: str) -> str:
    """What `python -c CODE` writes to stderr when stderr is a terminal (a pseudo-terminal, 100 columns)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL, env=cli_env())
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, out.decode()
    return out.decode()


def test_progress_on_a_terminal_is_a_tqdm_bar_and_log_lines_stay_whole():
    code = ("from bifocal.core import logs\n"
            "log = logs.get_logger('eval')\n"
            "bar = logs.progress(range(3), desc='items', unit='docs', log=log)\n"
            "assert not bar.plain\n"
            "for i in bar:\n"
            "    log.info('inside %d', i)\n")
    out = run_on_terminal(code)
    assert "items: 100%|" in out and "3/3" in out and "\r" in out  # tqdm's bar, redrawn in place
    for i in range(3):  # each log line written whole, the bar cleared before and redrawn after it
        assert f"\rbifocal: inside {i}\r\n" in out
    assert "items: 3/3 docs" not in out  # no plain lines besides the bar
    quiet = run_on_terminal(code.replace("log = logs", "logs.setup('warning')\nlog = logs")
                            .replace("assert not bar.plain", "assert bar.plain"))
    assert quiet == ""  # --quiet: no bar either


def test_logs_module_is_torch_free():
    code = ("import sys, bifocal.core.logs; "
            "sys.exit(1 if [m for m in ('torch', 'deepspeed', 'numpy', 'tqdm') if m in sys.modules] else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
