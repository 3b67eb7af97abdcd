"""`bifocal study extension --preset smoke-extension` end to end: base runs trained, each scheme
extended to 2x its length from them (`bifocal train --init-from`), RoPE also with PI and YaRN
fine-tuning, every model scored at the same token lengths, one report."""

from __future__ import annotations

import yaml

from bifocal.eval.results import load

from conftest import run_cli


def test_extension_study_extends_every_scheme_and_reports_all_at_the_same_lengths(tmp_path):
    run_cli(["study", "extension", "--preset", "smoke-extension", "--out", "out"], tmp_path, timeout=1200)
    out = tmp_path / "out"
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["bifocal", "ext-bifocal", "ext-rope", "pi-rope", "rope", "yarn-rope"]
    for name in ("ext-rope", "pi-rope", "yarn-rope", "ext-bifocal"):
        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        parent = name.split("-", 1)[1]
        assert cfg["train"]["init_from"] == str((out / "runs" / parent).resolve())
        assert cfg["train"]["init_step"] == 6 and cfg["train"]["max_steps"] == 3  # the parent's last step; half its budget
        assert cfg["model"]["max_seq_len"] == 64
    yarn = yaml.safe_load((out / "runs" / "yarn-rope" / "config.yaml").read_text())["model"]["position"]["rope_scaling"]
    assert yarn["type"] == "yarn" and yarn["factor"] == 2 and yarn["original_max_len"] == 32
    models = {}
    assert not (out / "results").exists() and not (out / "report.md").exists()  # an extrapolation study's place
    ext = out / "extension"
    for path in (ext / "results").glob("*.json"):
        r = load(path)
        models[r.model + ("" if r.variant == "none" else f"+{r.variant}")] = r
        assert [row["length"] for row in r.rows] == [16, 32, 64, 128]  # every model at the same lengths
    assert set(models) == {"rope", "rope+yarn", "bifocal", "rope[ext]", "rope[pi]", "rope[yarn]", "bifocal[ext]"}
    assert models["rope[yarn]"].train_len == 64 and models["rope"].train_len == 32
    digests = {row["targets"] for r in models.values() for row in r.rows}
    assert len(digests) == 1  # the same scored tokens for every model and length
    md = (ext / "report.md").read_text()
    assert "rope[yarn]" in md and "bifocal[ext]" in md and (ext / "extrapolation.png").stat().st_size > 5000


def test_an_extension_study_needs_its_section_and_valid_arms(tmp_path):
    proc = run_cli(["study", "extension", "--preset", "smoke", "--out", "o"], tmp_path, check=False)
    assert proc.returncode == 2 and "no `extension:` section" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("include: " + str(__import__("bifocal.eval.study", fromlist=["STUDY_DIR"]).STUDY_DIR / "smoke-extension.yaml")
                   + "\nextension: {arms: {pi: {scheme: rope, set: {model.position.rope_scaling: {type: pj}}}}}\n")
    proc = run_cli(["study", "extension", "--preset", str(bad), "--out", "o"], tmp_path, check=False)
    assert proc.returncode == 2 and "extension arm pi (rope)" in proc.stderr and "pj" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()
