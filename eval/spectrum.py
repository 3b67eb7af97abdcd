"""`bifocal eval spectrum`: what the spectral heads learned, and how focused every head attends.

Writes into RUN/spectrum/ (or --out):
  spectrum.json        Omega, A, Phi per spectral head (with the RoPE theta it started from),
                       the 2*pi/p comparison (--modulus), attention entropy and distance mass
  frequencies.png      learned Omega against theta (bifocal.run.metrics.frequency_figure)
  amplitude_phase.png  A and Phi per frequency pair against their initial values
  attention_entropy.png  mean entropy per head, and attention mass by distance, per head group

A model without spectral heads (rope, pope, nope) is not an error: the JSON says so, the two
spectral figures are not written, and the attention part is still measured (exit 0).
Without validation data (an export with no --data, or a run whose prepared dir is gone) the
attention part is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bifocal.core.errors import BifocalError
from bifocal.model import GPT

from .describe import model_name

TWO_PI = 2 * math.pi


# ---------------------------------------------------------------------------------------------
# Learned parameters


def spectral_heads(model: GPT) -> list[dict[str, Any]]:
    """One entry per spectral query head: layer, head index, kv head, omega/theta/amplitude/phase."""
    from bifocal.run.metrics import spectral_snapshot

    snap = spectral_snapshot(model, zero3=False)
    cfg = model.cfg
    n_spec = cfg.n_spectral_heads
    if n_spec == 0:
        return []
    group = cfg.n_head // cfg.n_kv_head
    from bifocal.model.position import spectral_init_freq

    theta = spectral_init_freq(cfg).numpy()  # where Omega started (RoPE's theta unless spectral_init says otherwise)
    out = []
    for layer in range(cfg.n_layer):
        prefix = f"blocks.{layer}.attn.position"
        for j in range(n_spec):
            out.append({"layer": layer, "head": cfg.n_head - n_spec + j, "kv_head": (cfg.n_head - n_spec + j) // group,
                        "omega": snap[f"{prefix}.omega"][j // group].tolist(), "theta": theta.tolist(),
                        "amplitude": snap[f"{prefix}.amplitude"][j].tolist(),
                        "phase": snap[f"{prefix}.phase"][j].tolist()})
    return out


def circular_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| on the circle of angles (mod 2*pi): a rotation by Omega and by Omega + 2*pi agree."""
    d = np.mod(np.asarray(a) - np.asarray(b), TWO_PI)
    return np.minimum(d, TWO_PI - d)


def nearest_to_modulus(freqs: np.ndarray, p: int) -> dict[str, Any]:
    """The frequency pair closest to some k * 2*pi/p (k = 1..p-1), on the circle."""
    targets = TWO_PI * np.arange(1, p) / p
    dist = circular_distance(np.asarray(freqs)[:, None], targets[None, :])  # (pairs, p-1)
    i, k = np.unravel_index(int(dist.argmin()), dist.shape)
    return {"pair": int(i), "omega": float(freqs[i]), "k": int(k) + 1, "target": float(targets[k]),
            "distance": float(dist[i, k])}


def modulus_report(heads: list[dict[str, Any]], p: int) -> list[dict[str, Any]]:
    """Per spectral head: the learned frequency nearest to k*2*pi/p, and the same at initialisation."""
    if p < 2:
        raise BifocalError(f"--modulus must be >= 2, got {p}")
    rows = []
    for h in heads:
        learned = nearest_to_modulus(np.asarray(h["omega"]), p)
        init = nearest_to_modulus(np.asarray(h["theta"]), p)
        rows.append({"layer": h["layer"], "head": h["head"], **learned, "init_distance": init["distance"],
                     "init_pair": init["pair"]})
    return rows


# ---------------------------------------------------------------------------------------------
# Figures


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frequencies(model: GPT, path: Path, modulus: int | None) -> Path:
    from bifocal.model.position import spectral_init_freq
    from bifocal.run.metrics import frequency_figure, spectral_snapshot

    fig = frequency_figure(spectral_snapshot(model, zero3=False), spectral_init_freq(model.cfg).numpy(),
                           model.cfg.n_head)
    if modulus:
        ax = fig.axes[0]
        ax.axhline(TWO_PI / modulus, color="red", lw=1, ls=":", label=f"2pi/{modulus}")
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_amplitude_phase(heads: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    for h in heads:
        lab = f"L{h['layer']} h{h['head']}"
        ax_a.plot(h["amplitude"], alpha=0.7, lw=1, label=lab)
        ax_p.plot(h["phase"], alpha=0.7, lw=1, label=lab)
    ax_a.axhline(1.0, color="k", ls="--", lw=1.5, label="init (1)")
    ax_p.axhline(0.0, color="k", ls="--", lw=1.5, label="init (~0)")
    ax_a.set(xlabel="frequency pair i", ylabel="amplitude A_i", title="Spectral heads: amplitude")
    ax_p.set(xlabel="frequency pair i", ylabel="phase Phi_i (rad)", title="Spectral heads: phase")
    for ax in (ax_a, ax_p):
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_attention(attn: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {g: f"C{i}" for i, g in enumerate(attn["groups"])}
    fig, (ax_e, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    heads = attn["per_head"]
    ax_e.bar(range(len(heads)), [h["entropy"] for h in heads], color=[colors[h["group"]] for h in heads])
    ax_e.set_xticks(range(len(heads)), [f"L{h['layer']}h{h['head']}" for h in heads], rotation=90, fontsize=6)
    from matplotlib.patches import Patch

    ax_e.set(ylabel="mean attention entropy (nats)", title="Focus per head (lower = sharper)")
    ax_e.legend(handles=[Patch(color=c, label=g) for g, c in colors.items()], fontsize=8)
    x = np.arange(len(attn["buckets"]))
    for g, stats in attn["groups"].items():
        ax_m.plot(x, stats["mass"], "o-", color=colors[g], label=f"{g} (H={stats['heads']})")
    ax_m.set_xticks(x, attn["buckets"])
    ax_m.set(xlabel="token distance", ylabel="mean attention mass", title="Where heads attend, by group")
    ax_m.grid(alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Data for the attention measurement


def _run_prepared_dir(model_path: Path) -> Path | None:
    cfg_file = model_path / "config.yaml"
    if not cfg_file.is_file():
        return None
    from bifocal.run.config import load_config

    return Path(load_config(cfg_file).data.prepared_dir)


def validation_windows(data_dir: Path, seq_len: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` seq_len-token windows of the validation split (training split if there is none)."""
    from bifocal.data_pipeline.loader import PreparedData, WindowSampler

    data = PreparedData(data_dir)
    split = "val" if "val" in data.splits and data.num_tokens("val") > seq_len + 1 else "train"
    sampler = WindowSampler(data, split, seq_len, micro_batch=n, seed=seed)
    x, _ = sampler.next_batch()
    return list(x)


# ---------------------------------------------------------------------------------------------
# Command


def analyze(model: GPT, windows: list[torch.Tensor] | None, modulus: int | None) -> dict[str, Any]:
    cfg = model.cfg
    heads = spectral_heads(model)
    result: dict[str, Any] = {"scheme": cfg.position.scheme, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                              "head_dim": cfg.head_dim, "rope_base": cfg.position.rope_base,
                              "spectral_heads": heads, "modulus": None, "attention": None}
    if not heads:
        result["message"] = f"no spectral heads (scheme {cfg.position.scheme}): only attention statistics"
    if modulus is not None and heads:
        result["modulus"] = {"p": modulus, "target": TWO_PI / modulus, "heads": modulus_report(heads, modulus)}
    if windows:
        from .attention_stats import summarize_attention

        result["attention"] = {"seq_len": int(windows[0].numel()), **summarize_attention(model, windows)}
    return result


def summary_table(result: dict[str, Any]) -> str:
    lines = []
    if result.get("message"):
        lines.append(result["message"])
    for h in result["spectral_heads"]:
        om, th = np.asarray(h["omega"]), np.asarray(h["theta"])
        moved = np.abs(om - th)
        lines.append(f"L{h['layer']} h{h['head']}: max |Omega-theta| {moved.max():.4f} (pair {moved.argmax()}), "
                     f"A in [{min(h['amplitude']):.3f}, {max(h['amplitude']):.3f}], "
                     f"|Phi| max {max(abs(x) for x in h['phase']):.3f}")
    mod = result.get("modulus")
    if mod:
        lines.append(f"\nnearest to k*2pi/{mod['p']} (2pi/{mod['p']} = {mod['target']:.4f}):")
        lines.append(f"{'head':<8} {'pair':>4} {'Omega':>8} {'k':>3} {'dist':>8} {'init dist':>10}")
        for r in mod["heads"]:
            lines.append(f"L{r['layer']} h{r['head']:<4} {r['pair']:>4} {r['omega']:>8.4f} {r['k']:>3} "
                         f"{r['distance']:>8.4f} {r['init_distance']:>10.4f}")
    attn = result.get("attention")
    if attn:
        lines.append(f"\nattention over {attn['windows']} windows of {attn['seq_len']} tokens:")
        lines.append(f"{'group':<10} {'heads':>5} {'entropy':>8}  " + " ".join(f"{b:>6}" for b in attn["buckets"]))
        for g, s in attn["groups"].items():
            lines.append(f"{g:<10} {s['heads']:>5} {s['entropy']:>8.3f}  " + " ".join(f"{m:>6.3f}" for m in s["mass"]))
    return "\n".join(lines)


def run(model_path: str | Path, out: str | Path | None = None, data: str | Path | None = None,
        modulus: int | None = None, windows: int = 8, device: str | None = None) -> tuple[dict[str, Any], Path]:
    """Analyse the model at `model_path`; write spectrum.json and the figures into `out`."""
    from .loading import load_model

    model_path = Path(model_path)
    model, _ = load_model(model_path, device=device)
    out_dir = Path(out) if out else model_path / "spectrum"
    data_dir = Path(data) if data else _run_prepared_dir(model_path)
    wins = None
    if data is not None or (data_dir is not None and data_dir.is_dir()):
        wins = validation_windows(data_dir, model.cfg.max_seq_len, windows)
    result = {"model": model_name(model_path), **analyze(model, wins, modulus)}
    if wins is None:
        result["attention_note"] = "no validation data (pass --data PREPARED_DIR): attention part skipped"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "spectrum.json"}
    if result["spectral_heads"]:
        files["frequencies"] = plot_frequencies(model, out_dir / "frequencies.png", modulus)
        files["amplitude_phase"] = plot_amplitude_phase(result["spectral_heads"], out_dir / "amplitude_phase.png")
    if result["attention"]:
        files["attention"] = plot_attention(result["attention"], out_dir / "attention_entropy.png")
    result["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(result, indent=1) + "\n")
    return result, out_dir


def main(args: argparse.Namespace) -> int:
    from bifocal.core.settings import resolve_arguments

    from .settings import SpectrumSettings

    args = resolve_arguments(SpectrumSettings, args, "eval spectrum")
    result, out_dir = run(args.model, out=args.out, data=args.data, modulus=args.modulus,
                          windows=getattr(args, "windows", 8), device=getattr(args, "device", None))
    print(f"spectrum of {result['model']} ({result['scheme']}):")
    print(summary_table(result))
    if result.get("attention_note"):
        print(result["attention_note"])
    for path in result["files"].values():
        print(f"wrote {path}")
    return 0
