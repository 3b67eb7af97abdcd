"""Hostile files and faults: no command runs code from a file it reads, a failing command writes
nothing, one writer per run directory, and damaged inputs give one line and exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_payload(path: Path, marker: Path, form: str) -> None:
    if form == "torch":
        torch.save({"module": Payload(marker)}, path)  # the zip format torch and DeepSpeed write
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))  # a bare pickle


def one_error_line(proc) -> str:
    """The run failed with exit 2 and a single `bifocal: error:` line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Split at carriage returns too: a progress bar may share the error's terminal line.
    lines = [x for x in re.split(r"[\r\n]", proc.stderr) if x.startswith("bifocal: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (and the set of directories), to prove nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def zero1_run(tiny_config, tmp_path_factory) -> Path:
    """A finished one-process ZeRO-1 run with one checkpoint (model states, optimizer shard, RNG)."""
    cwd = tmp_path_factory.mktemp("z1")
    run_dir = cwd / "run"
    run_cli(["train", "--config", str(tiny_config), "--run-dir", str(run_dir), "--set", "deepspeed.zero_stage=1",
             "--set", "train.max_steps=2", "--set", "train.save_every=2", "--set", "train.eval_every=0"], cwd)
    return run_dir


def poisoned_copy(run_dir: Path, tmp_path: Path, pattern: str, form: str) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    target = next((copy / "checkpoints" / "step_00000002").glob(pattern))
    marker = tmp_path / "PWNED"
    write_payload(target, marker, form)
    return copy, marker


@pytest.mark.parametrize("command", ["eval", "generate", "export", "resume"])
def test_poisoned_model_states_never_run(zero1_run, tmp_path, command):
    run_dir, marker = poisoned_copy(zero1_run, tmp_path, "mp_rank_00_model_states.pt",
                                    "torch" if command in ("eval", "resume") else "pickle")
    args = {"eval": ["eval", "ppl", str(run_dir), "--lengths", "32", "--max-docs", "1"],
            "generate": ["generate", str(run_dir), "--prompt", "It is", "--max-new-tokens", "2"],
            "export": ["export", str(run_dir), "--out", str(tmp_path / "export")],
            "resume": ["train", "--resume", "--run-dir", str(run_dir), "--set", "train.max_steps=3"]}[command]
    line = one_error_line(run_cli(args, tmp_path, check=False))
    assert not marker.exists()
    assert "mp_rank_00_model_states.pt" in line and "refused" in line
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("pattern", ["*optim_states.pt", "rng_rank00000.pt"])
def test_poisoned_optimizer_or_rng_file_never_runs_on_resume(zero1_run, tmp_path, pattern):
    run_dir, marker = poisoned_copy(zero1_run, tmp_path, pattern, "torch")
    before = tree_hashes(run_dir)
    line = one_error_line(run_cli(["train", "--resume", "--run-dir", str(run_dir), "--set", "train.max_steps=3"],
                                  tmp_path, check=False))
    assert not marker.exists() and "refused" in line and pattern.strip("*") in line
    assert tree_hashes(run_dir) == before  # refused before the first write


def test_truncated_checkpoint_file_is_one_line(zero1_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(zero1_run, copy)
    states = copy / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    line = one_error_line(run_cli(["generate", str(copy), "--prompt", "It", "--max-new-tokens", "2"], tmp_path, check=False))
    assert "mp_rank_00_model_states.pt" in line and "truncated" in line


def test_safe_load_refuses_payload_in_process(tmp_path):
    """The restricted loader itself: a payload is refused before any code of it runs, while a real
    DeepSpeed-free state dict loads."""
    from bifocal.run import safe_load
    from bifocal.core.errors import BifocalError

    marker = tmp_path / "PWNED"
    for form in ("torch", "pickle"):
        bad = tmp_path / f"bad-{form}.pt"
        write_payload(bad, marker, form)
        with pytest.raises(BifocalError, match="refused"):
            safe_load.load(bad)
        with pytest.raises(BifocalError, match="refused"):
            safe_load.verify([bad])
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0), "n": 1, "t": ("MT19937", torch.zeros(2, dtype=torch.int64))}, good)
    assert torch.equal(safe_load.load(good)["w"], torch.arange(3.0))


# ---------------------------------------------------------------------------------------------
# Damaged inputs: one line and exit 2 (in-process CLI: an uncaught exception would fail the test)


def cli_error(args: list[str], capsys) -> str:
    from bifocal.launcher.cli import main as cli

    assert cli(args) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("bifocal: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Fresh rope (plain Llama format) and bifocal exports of tiny random models."""
    from tiny_models import export, random_model, text_tokenizer

    root = tmp_path_factory.mktemp("exports")
    tok = text_tokenizer(["It is a truth universally acknowledged that a single man " * 40], root / "tok")
    return {scheme: export(random_model(tok.vocab_size, scheme), tok, root / scheme) for scheme in ("rope", "bifocal")}


def damaged_export(exports: dict[str, Path], scheme: str, tmp_path: Path) -> Path:
    out = tmp_path / scheme
    shutil.copytree(exports[scheme], out)
    return out


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_safetensors_is_one_line(exports, tmp_path, capsys, damage):
    out = damaged_export(exports, "rope", tmp_path)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    line = cli_error(["generate", str(out), "--prompt", "It is", "--device", "cpu"], capsys)
    assert "model.safetensors" in line and "unreadable" in line


def test_config_head_count_not_matching_weights_is_one_line(exports, tmp_path, capsys):
    """Checked against the weights' shapes (an export from before the head layout was recorded)."""
    from safetensors.torch import load_file, save_file

    out = damaged_export(exports, "bifocal", tmp_path)
    save_file(load_file(out / "model.safetensors"), out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["bifocal"].update(n_head=2, n_kv_head=2)  # head_dim 16: the spectral tables no longer fit
    (out / "config.json").write_text(json.dumps(cfg))
    line = cli_error(["eval", "ppl", str(out), "--data", str(out / "config.json")], capsys)
    assert "config.json does not match the weights" in line and "position" in line


def test_consistent_head_change_is_caught_by_the_weights(exports, tmp_path, capsys):
    """4 heads of 8 -> 2 heads of 16: every weight keeps its shape, the recorded layout does not."""
    out = damaged_export(exports, "rope", tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    cfg.update(num_attention_heads=2, num_key_value_heads=2, head_dim=cfg["head_dim"] * 2)
    (out / "config.json").write_text(json.dumps(cfg))
    line = cli_error(["generate", str(out), "--prompt", "It is", "--device", "cpu"], capsys)
    assert "n_head=2" in line and "n_head=4" in line


@pytest.mark.parametrize("setting,needle", [
    ("include: loop.yaml\n", "include cycle: loop.yaml -> loop.yaml"),
    ("include: 5\n", "include=5 is invalid"),
    ("optim: {betas: 0.9}\n", "optim.betas=0.9 is invalid"),
    ("model: [1, 2]\n", "`model` must be a mapping"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, setting, needle):
    (tmp_path / "loop.yaml").write_text(setting)
    line = cli_error(["train", "--config", str(tmp_path / "loop.yaml")], capsys)
    assert needle in line
    assert not (tmp_path / "runs").exists()


def test_set_betas_scalar_is_one_line(tmp_path, capsys):
    assert "optim.betas=0.9 is invalid: input should be a valid list" in cli_error(["train", "--set", "optim.betas=0.9"], capsys)


def corrupt_in_place(shard: Path) -> None:
    """Same size, valid header: the body overwritten with ids far beyond any vocabulary."""
    data = bytearray(shard.read_bytes())
    data[16:] = b"\xff" * (len(data) - 16)
    shard.write_bytes(bytes(data))


def test_shard_corrupted_in_place_is_one_line(zero1_run, tiny_config, tmp_path, capsys):
    import yaml

    prepared = Path(yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"])
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    corrupt_in_place(copy / "austen.val.bin")
    line = cli_error(["eval", "ppl", str(zero1_run), "--data", str(copy), "--lengths", "16", "--device", "cpu",
                      "--out", str(tmp_path / "ppl.json")], capsys)
    assert "austen.val.bin" in line and "corrupted" in line
    assert not (tmp_path / "ppl.json").exists()
    # Training draws windows from the damaged train shard: the same line, before any step runs.
    from bifocal.core.errors import BifocalError
    from bifocal.data_pipeline.loader import WindowSampler

    corrupt_in_place(copy / "code.train.bin")
    sampler = WindowSampler(copy, "train", seq_len=16, micro_batch=8, seed=0)
    with pytest.raises(BifocalError, match="code.train.bin.*outside the 512-token vocabulary"):
        for _ in range(4):
            sampler.next_batch()


def test_damaged_meta_json_is_not_reported_as_missing(tiny_config, tmp_path, capsys):
    import yaml

    prepared = Path(yaml.safe_load(tiny_config.read_text())["data"]["prepared_dir"])
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    (copy / "meta.json").write_text('{"format_version": 1, "tok')
    line = cli_error(["prepare", str(tiny_config), "--out", str(copy)], capsys)
    assert "unreadable meta.json" in line and "no meta.json" not in line


def test_eval_ppl_out_needs_overwrite_and_records_the_stride_used(zero1_run, tmp_path, capsys):
    from bifocal.launcher.cli import main as cli

    out = tmp_path / "ppl.json"
    args = ["eval", "ppl", str(zero1_run), "--lengths", "16", "--stride", "64", "--max-docs", "1", "--device", "cpu",
            "--out", str(out)]
    assert cli(args) == 0
    assert "--stride 64 is longer than length 16" in capsys.readouterr().err
    first = out.read_bytes()
    row = json.loads(first)["rows"][0]
    assert row["stride"] == 16 and json.loads(first)["extra"]["stride_requested"] == 64
    assert "--overwrite" in cli_error(args, capsys)
    assert out.read_bytes() == first
    assert cli(args + ["--overwrite"]) == 0


def test_eval_ppl_on_a_run_with_a_broken_config_is_one_line(zero1_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(zero1_run, copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("n_head: 4", "n_head: 3"))
    line = cli_error(["eval", "ppl", str(copy), "--lengths", "16", "--device", "cpu"], capsys)
    assert "config.yaml" in line and "n_head" in line


# ---------------------------------------------------------------------------------------------
# A failing command writes nothing; one writer per run directory


@pytest.mark.parametrize("change", ["tokenizer", "model"])
def test_refused_resume_writes_nothing(zero1_run, tiny_config, tmp_path, change):
    run_dir = tmp_path / "run"
    shutil.copytree(zero1_run, run_dir)
    before = tree_hashes(run_dir)
    sets = {"tokenizer": ["data.prepared_dir=" + str(tmp_path / "other"), "data.tokenizer.vocab_size=300"],
            "model": ["model.n_layer=3"]}[change]
    proc = run_cli(["train", "--resume", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]],
                   tmp_path, check=False)
    line = one_error_line(proc)
    assert ("another tokenizer" in line) if change == "tokenizer" else ("model.n_layer: 2 -> 3" in line)
    assert tree_hashes(run_dir) == before


def test_resume_takes_the_same_directories_given_relative(zero1_run, tmp_path):
    """config.yaml holds data.prepared_dir absolute; a study's config names it relative to its
    directory: the same directory is no change (an interrupted study run could not resume)."""
    import yaml

    from bifocal.run import checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(zero1_run, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    relative = os.path.relpath(saved["data"]["prepared_dir"], tmp_path)
    assert not Path(relative).is_absolute()
    run_cli(["train", "--resume", "--run-dir", str(run_dir), "--set", "train.max_steps=3",
             "--set", f"data.prepared_dir={relative}"], tmp_path)
    assert checkpoint.latest_checkpoint(run_dir)[0] == 3


def test_resume_applies_a_changed_learning_rate_and_records_it(zero1_run, tmp_path):
    import yaml

    run_dir = tmp_path / "run"
    shutil.copytree(zero1_run, run_dir)
    proc = run_cli(["train", "--resume", "--run-dir", str(run_dir), "--set", "train.max_steps=3",
                    "--set", "optim.lr=0.004"], tmp_path)
    assert "resume applies optim.lr: 0.01 -> 0.004" in proc.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.004
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lr3 = next(r["lr"] for r in rows if r["step"] == 3 and "lr" in r)
    # The lr step 3 applied, from the new base lr (not the checkpoint's): warmup (2 steps) is over
    # and the cosine of the new run length starts at its top; its end (0.1x) would come after step 3.
    assert lr3 == pytest.approx(0.004)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_second_start_is_refused_and_a_killed_runs_lock_is_taken_over(tiny_config, tmp_path):
    import signal
    import time

    from conftest import cli_env, start

    run_dir = tmp_path / "run"
    first = start(["-m", "bifocal.launcher.cli", "train", "--config", str(tiny_config), "--run-dir", str(run_dir),
                   "--set", "train.max_steps=100000", "--set", "train.save_every=2", "--set", "train.eval_every=0"],
                  tmp_path, cli_env(), Path(os.devnull), tmp_path / "first.log")
    try:
        deadline = time.time() + 240
        # Any complete checkpoint: with save_every=2 and keep_last=2 a given step's one is pruned
        # a few steps later, so polling for one name can miss it on a fast machine.
        while not (run_dir / "checkpoints").is_dir() or not checkpoint_steps(run_dir):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == first.pid
        for args in (["--config", str(tiny_config)], ["--resume"]):
            proc = run_cli(["train", *args, "--run-dir", str(run_dir)], tmp_path, check=False)
            line = one_error_line(proc)
            assert f"in use by pid {first.pid}" in line or "--resume" in line
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / ".lock").exists()  # left behind by kill -9: stale
    at = checkpoint_steps(run_dir)[-1]
    run_cli(["train", "--resume", "--run-dir", str(run_dir), "--set", f"train.max_steps={at + 1}"], tmp_path)
    assert not (run_dir / ".lock").exists()
    rows = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]
    assert rows == list(range(1, at + 2))  # one row per step, the killed attempt's extra steps dropped


def checkpoint_steps(run_dir: Path) -> list[int]:
    from bifocal.run import checkpoint

    return [s for s, _ in checkpoint.complete_checkpoints(run_dir)]


def test_lock_of_another_live_process_or_host_is_respected(tmp_path):
    import socket

    from bifocal.core.errors import BifocalError
    from bifocal.run.run_lock import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for holder in ({"host": socket.gethostname(), "pid": os.getppid()}, {"host": "elsewhere", "pid": 1}):
        (run_dir / ".lock").write_text(json.dumps(holder))
        with pytest.raises(BifocalError, match=f"in use by pid {holder['pid']} on {holder['host']}"):
            RunLock(run_dir).acquire()
    # A lock whose process is gone is taken over, and released without a trace.
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    (run_dir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    with RunLock(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert not (run_dir / ".lock").exists()
    fresh = tmp_path / "a" / "b"
    with RunLock(fresh):
        assert fresh.is_dir()
    assert not (tmp_path / "a").exists()  # directories made only for the lock are removed again


def test_no_validation_data_is_refused_before_step_one(tmp_path):
    import gzip

    import yaml

    from conftest import DATA

    with gzip.open(DATA / "nl_small_austen.jsonl.gz", "rt", encoding="utf-8") as f:
        doc = json.loads(f.readline())
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": doc["text"][:30_000]}) + "\n")
    cfg = {"model": {"n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 16},
           "data": {"sources": [{"name": "one", "path": "one.jsonl"}], "prepared_dir": str(tmp_path / "prepared"),
                    "tokenizer": {"type": "bpe", "vocab_size": 300, "train_chars": 30_000}, "val_fraction": 0.1},
           "train": {"micro_batch": 2, "max_steps": 2, "save_every": 2, "eval_batches": 1}}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli(["train", "--config", str(tmp_path / "one.yaml"), "--run-dir", str(tmp_path / "run")], tmp_path,
                   check=False)
    line = one_error_line(proc)
    assert "validation" in line and "data.val_fraction=0" in line
    assert not (tmp_path / "run").exists()
    # Asking for no validation trains with a warning and no validation rows.
    ok = run_cli(["train", "--config", str(tmp_path / "one.yaml"), "--run-dir", str(tmp_path / "run"),
                  "--set", "data.val_fraction=0", "--set", "data.prepared_dir=" + str(tmp_path / "prepared0")], tmp_path)
    assert "training without validation" in ok.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_loss" in r for r in rows) and checkpoint_steps(tmp_path / "run") == [2]


def test_init_from_hf_reads_no_pickled_weights(tmp_path):
    """A Hugging Face directory whose weights are a pickle (pytorch_model.bin) is refused unread."""
    transformers = pytest.importorskip("transformers")
    from bifocal.model.surgery import load_spectralized

    src = tmp_path / "llama"
    transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2).save_pretrained(src)
    marker = tmp_path / "PWNED"
    write_payload(src / "pytorch_model.bin", marker, "pickle")
    with pytest.raises(OSError, match="safetensors"):
        load_spectralized(src)
    assert not marker.exists()


def test_jsonl_starting_with_null_is_one_line_not_a_crash(tmp_path):
    """Found by the fuzz: pyarrow's JSON reader segfaults on a first record `null` (in a child
    process here, so a regression cannot take the test session down)."""
    import yaml

    (tmp_path / "null.jsonl").write_text('null\n{"text": "a document"}\n')
    cfg = {"data": {"sources": [{"name": "n", "path": "null.jsonl"}], "prepared_dir": str(tmp_path / "prepared")}}
    (tmp_path / "null.yaml").write_text(yaml.safe_dump(cfg))
    line = one_error_line(run_cli(["prepare", str(tmp_path / "null.yaml")], tmp_path, check=False))
    assert "null.jsonl: line 1 is null, not an object" in line


# ---------------------------------------------------------------------------------------------
# I/O faults during a run (issue 21, kind 5): real small filesystems (tmpfs, mounted by the test
# as root, as CI runs), a run directory removed mid-run, and logging on a full filesystem.

@pytest.fixture
def small_fs(tmp_path):
    """mount(nbytes) -> a fresh tmpfs of that size; remount(path, nbytes) resizes one."""
    import subprocess

    mounts: list[Path] = []

    def mount(nbytes: int) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounts.append(where)
        return where

    def remount(where: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)

    mount.remount = remount
    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _disk_bytes(root: Path) -> int:
    """What files under root take on a tmpfs (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in root.rglob("*") if p.is_file())


FULL_DISK_SETS = ["model.n_layer=2", "model.d_model=128", "train.save_every=5", "train.eval_every=0",
                  "train.keep_last=3"]


def test_full_disk_mid_run_is_one_line_removes_the_partial_checkpoint_and_resumes(tiny_config, tmp_path, small_fs):
    """The issue's run: step 5's checkpoint fits, step 10's does not. One line naming the checkpoint,
    what failed and the newest complete checkpoint, exit 2, no partial step_00000010 left holding
    space; after space is freed, --resume continues from step 5 to the end."""
    sets = [a for s in FULL_DISK_SETS for a in ("--set", s)]
    ref = tmp_path / "ref"
    run_cli(["train", "--config", str(tiny_config), "--run-dir", str(ref), *sets, "--set", "train.max_steps=5"], tmp_path)
    ckpt = _disk_bytes(ref / "checkpoints" / "step_00000005")
    fs = small_fs(_disk_bytes(ref) + ckpt // 2)  # room for step 5's checkpoint, not for step 10's too
    run_dir = fs / "run"
    proc = run_cli(["train", "--config", str(tiny_config), "--run-dir", str(run_dir), *sets,
                    "--set", "train.max_steps=10"], tmp_path, check=False)
    line = one_error_line(proc)
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_00000010'} not saved" in line
    assert "bytes free there" in line and "the partial checkpoint was removed" in line
    assert f"newest complete checkpoint: {run_dir / 'checkpoints' / 'step_00000005'}" in line
    assert not (run_dir / "checkpoints" / "step_00000010").exists()
    assert checkpoint_steps(run_dir) == [5]
    small_fs.remount(fs, f"size={4 * _disk_bytes(ref) + (1 << 20)}")  # space freed
    run_cli(["train", "--resume", "--run-dir", str(run_dir)], tmp_path)
    assert checkpoint_steps(run_dir) == [5, 10]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))


def _start_and_wait_for_a_checkpoint(tiny_config, tmp_path, run_dir, save_every: int = 2):
    import time

    from conftest import cli_env, start

    log = tmp_path / "run.log"
    proc = start(["-m", "bifocal.launcher.cli", "train", "--config", str(tiny_config), "--run-dir", str(run_dir),
                  "--set", "train.max_steps=100000", f"train.save_every={save_every}", "train.eval_every=0"],
                 tmp_path, cli_env(), Path(os.devnull), log)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints").is_dir() or not checkpoint_steps(run_dir):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    return proc, log


@pytest.mark.parametrize("fault", ["read_only", "vanished"])
def test_run_directory_turning_read_only_or_vanishing_mid_run_is_one_line(tiny_config, tmp_path, small_fs, fault):
    """The run directory's filesystem remounted read-only (or the directory removed) while the run
    trains: the next checkpoint fails with one line and exit 2, no traceback; the logging that
    fails first is dropped with a warning instead of taking the run down by itself."""
    import subprocess

    fs = small_fs(256 << 20) if fault == "read_only" else tmp_path
    run_dir = fs / "run"
    # The fault lands just after a checkpoint completed, 40 training steps before the next save
    # starts: the next save meets it when it creates its directory, not halfway through its files.
    proc, log = _start_and_wait_for_a_checkpoint(tiny_config, tmp_path, run_dir, save_every=40)
    try:
        newest = checkpoint_steps(run_dir)[-1]
        if fault == "read_only":
            small_fs.remount(fs, "ro")
        else:
            # Moved away at once (rmtree raced with the run's writes: "Directory not empty"); the
            # run's path is gone either way.
            run_dir.rename(tmp_path / "gone")
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())
    line = one_error_line(result)
    assert "not saved: creating its directory failed" in line
    if fault == "read_only":
        assert "Read-only file system" in line
        # what was complete before stays complete (the newest may be pruned only by a later save)
        assert checkpoint_steps(run_dir)[-1] >= newest
        assert "newest complete checkpoint: " + str(run_dir / "checkpoints") in line
    else:
        assert "the run directory vanished" in line and "newest complete checkpoint: none" in line
        assert not run_dir.exists()  # nothing recreated it


def test_logging_on_a_full_filesystem_does_not_take_the_run_down(tiny_config, tmp_path, small_fs):
    """metrics.jsonl and TensorBoard's events on a full filesystem, checkpoints on one with room:
    each logging destination fails with one warning line and the run trains to the end."""
    fs = small_fs(64 << 10)
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill it to the last page
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (fs / "tb").mkdir()
    os.symlink(fs / "metrics.jsonl", run_dir / "metrics.jsonl")  # dangling until the run writes it
    os.symlink(fs / "tb", run_dir / "tensorboard")
    proc = run_cli(["train", "--config", str(tiny_config), "--run-dir", str(run_dir), "--set", "train.max_steps=4",
                    "train.save_every=2", "train.eval_every=2"], tmp_path)
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("bifocal: warning:")]
    assert any(str(run_dir / "metrics.jsonl") in w and "No space left on device" in w for w in warnings), proc.stderr
    assert any("TensorBoard events cannot be written" in w for w in warnings), proc.stderr
    assert "Traceback" not in proc.stderr
    assert checkpoint_steps(run_dir) == [2, 4] and "finished at step 4" in proc.stdout


def test_full_disk_under_two_ranks_ends_without_a_hang(tiny_config, tmp_path, small_fs):
    """ZeRO-2 on two ranks (each writes its optimizer shard, rank 0 the model): whichever rank
    the full disk stops first, every rank agrees, the partial checkpoint goes, step 5's stays."""
    import re

    from conftest import free_port

    def launch(run_dir: Path, *sets: str, check: bool = True):
        args = ["launch", "--num_gpus", "2", "--master_port", str(free_port()), "--", "train", "--config",
                str(tiny_config), "--run-dir", str(run_dir), *[a for s in FULL_DISK_SETS + list(sets) for a in ("--set", s)],
                "--set", "deepspeed.zero_stage=2", "train.micro_batch=2"]
        return run_cli(args, tmp_path, timeout=600, check=check)

    ref = tmp_path / "ref"
    launch(ref, "train.max_steps=5")
    fs = small_fs(_disk_bytes(ref) + _disk_bytes(ref / "checkpoints" / "step_00000005") // 2)
    run_dir = fs / "run"
    proc = launch(run_dir, "train.max_steps=10", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = {re.sub(r"^\[rank\d+\]: ", "", x) for x in re.split(r"[\r\n]", proc.stdout + proc.stderr)
             if "bifocal: error:" in x}
    assert 1 <= len(lines) <= 2, lines  # one line a rank (the reason may differ: its own, or "another rank")
    for line in lines:
        assert f"checkpoint {run_dir / 'checkpoints' / 'step_00000010'} not saved" in line
        assert f"newest complete checkpoint: {run_dir / 'checkpoints' / 'step_00000005'}" in line
    assert not (run_dir / "checkpoints" / "step_00000010").exists() and checkpoint_steps(run_dir) == [5]
