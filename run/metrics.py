"""What a run leaves for people to read: metrics.jsonl, TensorBoard scalars, spectral histograms,
a learned-frequency figure, and a loss curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bifocal.model.position import SpectralRotary


def spectral_snapshot(module: torch.nn.Module, zero3: bool) -> dict[str, np.ndarray]:
    """Omega (theta + offset), A, Phi per layer and PoPE's delta, as numpy. Collective under ZeRO-3
    (parameters are gathered from their partitions), so every rank must call it."""
    params = [(n, p) for n, p in module.named_parameters() if ".position." in n]
    if not params:
        return {}
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in params])
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    out: dict[str, np.ndarray] = {}
    with ctx, torch.no_grad():
        for name, p in params:
            out[name] = p.detach().float().cpu().numpy().copy()
        for name, sub in module.named_modules():
            if isinstance(sub, SpectralRotary) and sub.n_spectral:
                out[f"{name}.omega"] = sub.omega.detach().cpu().numpy().copy()
    return out


def frequency_figure(snapshot: dict[str, np.ndarray], head_dim: int, base: float):
    """Learned Omega of every spectral head against the RoPE theta it started from (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    theta = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(len(theta)), theta, "k--", lw=2, label="RoPE theta (init)")
    for name, omega in snapshot.items():
        if name.endswith(".omega"):
            layer = name.split(".")[1]
            for h, row in enumerate(omega):
                ax.plot(np.arange(len(row)), np.abs(row), alpha=0.6, lw=1, label=f"L{layer} h{h}" if h == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("frequency pair i")
    ax.set_ylabel("|Omega_i| (rad / token)")
    ax.set_title("Spectral heads: learned frequencies vs RoPE")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def drop_rows_after(run_dir: Path, step: int) -> None:
    """A resumed run trains the steps after its checkpoint again: drop their rows from the
    interrupted attempt, so metrics.jsonl keeps one row per step (rewritten atomically)."""
    import os

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            pass  # not ours to judge: keep it
        kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value == value:
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key}", value, step)

    def spectral(self, step: int, snapshot: dict[str, np.ndarray], head_dim: int, base: float) -> None:
        if not (self.enabled and self.tb is not None and snapshot):
            return
        for name, values in snapshot.items():
            short = name.replace("blocks.", "layer").replace(".attn.position.", "/")
            finite = values[np.isfinite(values)]  # a diverged run must still log what it can
            if finite.size:
                self.tb.add_histogram(f"spectral/{short}", finite, step)
        if any(k.endswith(".omega") for k in snapshot):
            import matplotlib.pyplot as plt

            fig = frequency_figure(snapshot, head_dim, base)
            self.tb.add_figure("spectral/frequencies_vs_rope", fig, step)
            plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: str | Path) -> Path | None:
    """loss.png: training and validation loss against step."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
