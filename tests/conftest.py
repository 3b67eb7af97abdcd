"""Shared fixtures: a tiny real corpus slice, a tiny run config, and a CLI runner for
multi-process tests (real DeepSpeed engines on CPU with gloo)."""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

from zygote import Zygote

# Fuzz tests (tests/test_fuzz.py): CI runs a fixed set of examples (derandomized, so a red run is
# reproducible and never random); BIFOCAL_FUZZ=random draws 20x more, new ones each run, by hand.
settings.register_profile("ci", derandomize=True, max_examples=120, deadline=None, print_blob=True)
settings.register_profile("random", derandomize=False, max_examples=2400, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("BIFOCAL_FUZZ", "ci"))

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


# pytest-xdist's worker name ("gw0", "gw1", ...), absent when the suite runs in one process.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def free_port() -> int:
    """A free TCP port on 127.0.0.1. Under pytest-xdist each worker draws from its own block below
    Linux's ephemeral range (32768+), so two workers never hand out the same port between the check
    and the bind, and no outgoing connection takes it meanwhile."""
    if WORKER is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    base = 20_000 + 1_000 * (int(WORKER.removeprefix("gw")) % 12)
    for port in random.sample(range(base, base + 1_000), 1_000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + 999}")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


# Test processes are forked from a server with torch already imported (tests/zygote.py: the
# same process, at half the CPU); BIFOCAL_TEST_ZYGOTE=0 starts each with a fresh interpreter.
ZYGOTE = Zygote(cli_env) if os.environ.get("BIFOCAL_TEST_ZYGOTE", "1") != "0" else None


def start(argv: list[str], cwd: Path, env: dict[str, str], stdout: Path, stderr: Path | None = None):
    """`python ARGV` (["-m", MODULE, ...] or [SCRIPT, ...]) in its own process, stdout and stderr
    into files (stderr None: into stdout's file); a Popen (or its stand-in: poll, wait, kill)."""
    if ZYGOTE is not None:
        return ZYGOTE.spawn(argv, cwd, env, stdout, stderr)
    out = open(stdout, "ab")
    err = subprocess.STDOUT if stderr is None else open(stderr, "ab")
    try:
        return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    finally:
        out.close()
        if stderr is not None:
            err.close()


def run_cli(args: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`bifocal ARGS` in its own process, as a user would run it (`start`)."""
    with tempfile.TemporaryDirectory(prefix="bifocal-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = start(["-m", "bifocal.launcher.cli", *args], cwd, cli_env(), out, err)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        result = subprocess.CompletedProcess([sys.executable, "-m", "bifocal.launcher.cli", *args], proc.returncode,
                                             out.read_text(), err.read_text())
    if check and result.returncode != 0:
        raise AssertionError(f"bifocal {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def _slice(src: Path, dst: Path, n_docs: int, chars: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f, gzip.open(dst, "wt", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == n_docs:
                break
            doc = json.loads(line)
            out.write(json.dumps({"source": doc["source"], "text": doc["text"][:chars]}) + "\n")


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """A YAML run config: a 2-layer bifocal model on slices of the bundled corpora, data
    prepared once for the session."""
    root = tmp_path_factory.mktemp("tiny")
    _slice(DATA / "nl_small_austen.jsonl.gz", root / "austen.jsonl.gz", 6, 40_000)
    _slice(DATA / "code_small_pystdlib.jsonl.gz", root / "code.jsonl.gz", 40, 6_000)
    cfg = {
        "model": {"n_layer": 2, "n_head": 4, "d_model": 32, "max_seq_len": 32,
                  "position": {"scheme": "bifocal", "spectral_heads": 2, "spectral_lr_mult": 3.0}},
        "data": {"sources": [{"name": "austen", "path": "austen.jsonl.gz"}, {"name": "code", "path": "code.jsonl.gz"}],
                 "tokenizer": {"type": "bpe", "vocab_size": 512, "train_chars": 200_000},
                 "val_fraction": 0.1, "prepared_dir": str(root / "prepared")},
        "train": {"run_name": "tiny", "micro_batch": 4, "max_steps": 8, "log_every": 1,
                  "eval_every": 4, "eval_batches": 2, "save_every": 4, "keep_last": 2},
        "optim": {"lr": 1.0e-2, "warmup_steps": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_cli(["prepare", str(path)], cwd=root)
    return path


def perturb_position_params(model) -> None:
    """Move position parameters off their initialisation (delta into [-2pi, 0]), so anything that
    dropped or reset them would change the logits."""
    import math

    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("position.delta"):
                p.uniform_(-2 * math.pi, 0)
            elif ".position." in name:
                p.add_(0.05 * torch.randn_like(p))


# -- parallel workers (pytest-xdist: the README's test command runs `-n 2 --dist loadgroup`) --------
#
# Tests that share a module- or class-scoped fixture (often a whole multi-rank run) form one group,
# which runs on one worker, so the fixture is built once. xdist's own `loadgroup` reads
# `xdist_group` marks through node ids that pytest 9.2 no longer lets it change
# (pytest-dev/pytest-xdist#1386: it silently stops grouping), so the groups travel another way:
# each worker writes them, as it collects, to a directory the controller named, and the controller
# schedules with them (GroupScheduling). tests/test_parallel.py fails if either end stops working.

GROUPS = "bifocal_groups"  # the directory's key in each worker's workerinput


def pytest_configure(config) -> None:
    if WORKER is not None:
        import torch

        # Two workers share two cores: one intra-op thread each, as every CLI subprocess gets
        # (cli_env), instead of four threads spinning against each other.
        torch.set_num_threads(1)


def pytest_unconfigure(config) -> None:
    if ZYGOTE is not None:
        ZYGOTE.close()
    if hasattr(config, "_bifocal_groups"):
        import shutil

        shutil.rmtree(config._bifocal_groups, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Controller: the directory where every worker writes its groups."""
    config = node.config
    if not hasattr(config, "_bifocal_groups"):
        config._bifocal_groups = tempfile.mkdtemp(prefix="bifocal-groups-")
    node.workerinput[GROUPS] = config._bifocal_groups


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Controller, `--dist loadgroup`: schedule by the groups the workers wrote."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """xdist's scope scheduler (a group is one unit of work, given to whichever worker runs
        low) with our groups as scopes, in the workers' collection order (heaviest first)."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # keep the order the workers sorted
            self.groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # every worker has collected (and written) by the first call
                self.groups = {}
                for path in Path(config._bifocal_groups).glob("*.json"):
                    self.groups.update(json.loads(path.read_text()))
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Worker: group the tests that share a module- or class-scoped fixture (union over shared
    fixtures), then order them for the scheduler: groups first, then the tests that use the
    prepared tiny corpus (most start processes), then the rest, so the short tests fill the end
    and no worker idles while the other finishes a long one. Reads `item._fixtureinfo` (pytest's,
    not public); tests/test_parallel.py fails if it changes."""
    directory = getattr(config, "workerinput", {}).get(GROUPS)
    if directory is None:
        return
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared: dict[int, list[str]] = {}
    for i, item in enumerate(items):
        keys = [f"{item.module.__name__}.{name}" for name, defs in item._fixtureinfo.name2fixturedefs.items()
                if defs and defs[-1].scope in ("module", "class", "package")]
        shared[i] = keys
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    groups = {item.nodeid: root(shared[i][0]) for i, item in enumerate(items) if shared[i]}
    order = {id(item): (0 if shared[i] else 1 if "tiny_config" in item.fixturenames else 2, i)
             for i, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])
    tmp = Path(directory) / f".{WORKER}.json"
    tmp.write_text(json.dumps(groups))
    tmp.replace(Path(directory) / f"{WORKER}.json")  # whole or absent for the controller
