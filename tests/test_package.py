"""The package as a user installs it: presets and demo corpora found by name, and the built wheel
working from an empty directory (no clone on the path)."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pytest

from bifocal import configs
from bifocal.core.errors import BifocalError
from bifocal.run.config import config_path, load_config

from conftest import REPO, cli_env


def test_presets_are_found_by_name_and_a_disk_path_wins(tmp_path, monkeypatch):
    assert config_path("gpu/125m") == configs.ROOT / "gpu" / "125m.yaml"
    assert config_path("gpu/125m.yaml") == configs.ROOT / "gpu" / "125m.yaml"
    monkeypatch.chdir(tmp_path)  # outside a clone the README's `configs/...` spelling still works
    assert config_path("configs/gpu/350m.yaml") == configs.ROOT / "gpu" / "350m.yaml"
    assert configs.find("cpu", "study") == configs.ROOT / "study" / "cpu.yaml"
    (tmp_path / "gpu").mkdir()
    mine = tmp_path / "gpu" / "125m.yaml"
    mine.write_text("train: {max_steps: 7}\n")
    assert config_path("gpu/125m.yaml") == Path("gpu/125m.yaml")
    assert load_config("gpu/125m.yaml").train.max_steps == 7
    with pytest.raises(BifocalError, match="config file not found: gpu/9b .*gpu/125m"):
        config_path("gpu/9b")


def test_demo_data_sources_point_into_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    for src in cfg.data.sources:
        assert Path(src.path).is_file(), src.path


def _fresh_venv(tmp: Path) -> Path:
    """A new virtual environment holding only the built wheel; the heavy dependencies come from
    this interpreter's site-packages through a .pth file (editable finders there are not run)."""
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, timeout=300)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [venv_site] = venv.glob("lib/python*/site-packages")
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    [wheel] = wheels.glob("bifocal-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    return venv


@pytest.mark.slow
def test_installed_wheel_trains_and_evaluates_from_an_empty_directory(tmp_path):
    venv = _fresh_venv(tmp_path)
    work, elsewhere = tmp_path / "empty", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()

    def bifocal(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(venv / "bin" / "bifocal"), *args], cwd=cwd, env=cli_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"bifocal {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import bifocal.launcher as m; print(m.__file__)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the wheel, not this checkout
    version = bifocal("--version", cwd=work).stdout.strip()
    assert version.startswith("bifocal ")
    as_module = subprocess.run([str(venv / "bin" / "python"), "-m", "bifocal", "--version"], cwd=work,
                               capture_output=True, text=True, check=True).stdout.strip()
    assert as_module == version
    assert "train.max_steps" in bifocal("config", "train.max_steps", cwd=work).stdout
    bifocal("train", "--set", "train.max_steps=2", "train.eval_every=0", "train.save_every=0",
            "data.tokenizer.vocab_size=300", "data.tokenizer.train_chars=200000", "model.n_layer=1", cwd=work)
    assert (work / "runs" / "demo" / "summary.json").is_file()
    out = elsewhere / "ppl.json"
    bifocal("eval", "ppl", str(work / "runs" / "demo"), "--lengths", "64", "--max-tokens", "512",
            "--out", str(out), cwd=elsewhere)
    assert out.is_file()
