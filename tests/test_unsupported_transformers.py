"""An export read by a transformers older than the floor never computes something else: a
Llama-format export carries transformers 4.x's keys too and loads with the same logits; a
custom-code export refuses with one line. Needs an interpreter with transformers 4.x, named by
BIFOCAL_TRANSFORMERS4_PYTHON (CI's oldest lane makes one: .ci/lane)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from bifocal.model.hf.compat import MIN_TRANSFORMERS
from bifocal.model.hf.hf_io import save_hf

from test_hf_export import bpe, tiny  # noqa: F401  (bpe is a fixture)

LEGACY = os.environ.get("BIFOCAL_TRANSFORMERS4_PYTHON")
pytestmark = pytest.mark.skipif(not LEGACY, reason="needs BIFOCAL_TRANSFORMERS4_PYTHON, a Python with transformers 4.x "
                                                   "(CI's oldest lane sets it)")

SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
path, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
try:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
except ImportError as exc:
    print(json.dumps({"refused": str(exc)}))
else:
    with torch.no_grad():
        print(json.dumps({"logits": model(ids).logits.tolist()}))
"""


def _read_with_transformers4(path, ids) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(path.parent / "modules")}
    res = subprocess.run([LEGACY, "-c", SCRIPT, str(path), json.dumps(ids.tolist())], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("position", [{"rope_base": 5e5},
                                      {"rope_scaling": {"type": "pi", "factor": 4.0, "original_max_len": 64}},
                                      {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_len": 64}},
                                      {"rope_scaling": {"type": "ntk", "factor": 4.0, "original_max_len": 64}}])
def test_llama_exports_load_in_transformers4_with_the_same_logits(position, bpe, tmp_path):  # noqa: F811
    model = tiny("rope", bpe.vocab_size, position=position)
    out = save_hf(model, bpe, tmp_path / "export")
    ids = torch.randint(0, bpe.vocab_size, (1, 150), generator=torch.Generator().manual_seed(0))  # past 64 positions
    got = torch.tensor(_read_with_transformers4(out, ids)["logits"])
    assert (got - model(ids)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("scheme", ["bifocal", "pope"])
def test_custom_code_exports_refuse_transformers4_with_one_line(scheme, bpe, tmp_path):  # noqa: F811
    out = save_hf(tiny(scheme, bpe.vocab_size), bpe, tmp_path / "export")
    message = _read_with_transformers4(out, torch.tensor([[1, 2, 3]]))["refused"]
    assert "\n" not in message and f"needs transformers>={MIN_TRANSFORMERS}" in message and "found 4." in message
