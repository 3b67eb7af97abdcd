"""What a run leaves for people to read: metrics.jsonl, TensorBoard scalars, hyperparameters,
spectral histograms, a learned-frequency figure, a loss curve PNG, training lines in batch logs,
and optionally the same scalars in Weights & Biases."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bifocal.core import logs
from bifocal.model.position import SpectralRotary, position_parameters

log = logs.get_logger(__name__)


def spectral_snapshot(module: torch.nn.Module, zero3: bool) -> dict[str, np.ndarray]:
    """Every position parameter by full name (spectral heads' omega offset or log-scale (kv heads,
    d/2), amplitude and phase (spectral heads, d/2); PoPE's delta (n_kv_head, d)) plus each spectral
    layer's Omega as `<layer>.omega` (spectral kv heads, d/2) in radians per token; float32 numpy.
    Collective under ZeRO-3 (parameters are gathered from their partitions), so every rank must
    call it."""
    params = list(position_parameters(module).items())
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


def frequency_figure(snapshot: dict[str, np.ndarray], init_freq: np.ndarray, n_head: int | None = None):
    """Learned Omega of every spectral head against the frequencies it started from, `init_freq`
    (d/2,) in radians per token (the model's answer: bifocal.model.position.spectral_init_freq),
    log scale; returns the matplotlib Figure. Each line is labelled with its layer and head
    (spectral heads are a layer's last heads, so with `n_head` the label is the head's index in the
    layer, else its index among the spectral)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(len(init_freq)), init_freq, "k--", lw=2, label="Omega at init")
    for name, omega in snapshot.items():
        if name.endswith(".omega"):
            layer = name.split(".")[1]
            first = n_head - len(omega) if n_head is not None else 0
            for h, row in enumerate(omega):
                ax.plot(np.arange(len(row)), np.abs(row), alpha=0.6, lw=1, label=f"L{layer} h{first + h}")
    ax.set_yscale("log")
    ax.set_xlabel("frequency pair i")
    ax.set_ylabel("|Omega_i| (rad / token)")
    ax.set_title("Spectral heads: learned frequencies vs RoPE")
    ax.legend(fontsize=6, ncol=max(2, len(ax.lines) // 12))
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


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_line(record: dict[str, Any], max_steps: int, seconds_per_step: float) -> str:
    """One training line for logs without a terminal (where the progress bar is off): step, loss,
    learning rate, tokens/s and the ETA from `seconds_per_step`. `record` holds step, loss, lr and
    tokens_per_s."""
    eta = _duration((max_steps - record["step"]) * seconds_per_step)
    return (f"step {record['step']}/{max_steps}: loss {record['loss']:.4f}, lr {record['lr']:.3g}, "
            f"{record['tokens_per_s']:,.0f} tokens/s, ETA {eta}")


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested run config as TensorBoard hyperparameters: dotted keys, scalars kept, the rest as text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def require_wandb(project: str | None) -> None:
    """Raise BifocalError before the run starts when W&B logging is asked for (`project` not None)
    but wandb is not installed."""
    if project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        from bifocal.core.errors import BifocalError

        raise BifocalError(f"train.wandb_project={project!r} needs wandb: pip install 'bifocal[wandb]'") from None


def _quiet_tensorboard_threads() -> None:
    """TensorBoard writes events from a background thread; when a write fails there (a full disk),
    the thread dies printing a traceback, and the writer raises the same error on its next call in
    the training thread, where MetricsLogger reports it in one line. Silence the thread's copy."""
    default = threading.excepthook
    if getattr(default, "bifocal_quiet_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not type(args.thread).__module__.startswith("tensorboard."):
            default(args)

    hook.bifocal_quiet_tensorboard = True
    threading.excepthook = hook


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger. `config` (the run config as a dict) goes to
    TensorBoard's hyperparameters and to W&B; `wandb_project` turns W&B logging on (the same
    scalars as TensorBoard; WANDB_MODE=offline works without an account).

    Logging never takes a run down: a destination that fails (a full disk, a vanished directory,
    W&B's service) is reported in one warning line and dropped; training goes on, and whether
    checkpoints can still be written decides whether the run does (run/checkpoint.py)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, config: dict | None = None,
                 wandb_project: str | None = None, resume: bool = False) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.config = config or {}
        self.tb = None
        self.wandb = None
        self.jsonl = enabled
        self.last: dict[str, float] = {}
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_threads()
            with self._guard("tb", "TensorBoard events"):
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if enabled and wandb_project:
            import wandb

            # The run directory's name is the W&B run id, so a resumed run continues its own curves.
            with self._guard("wandb", "Weights & Biases"):
                self.wandb = wandb.init(project=wandb_project, name=run_dir.name, id=run_dir.name,
                                        dir=str(run_dir), config=self.config, resume="allow" if resume else None)

    @contextlib.contextmanager
    def _guard(self, sink: str, what: str, quiet: bool = False):
        """Drop a failing destination (`sink`: the attribute that holds it) with one warning line."""
        try:
            yield
        except Exception as exc:  # OSError from a full disk; tensorboard and wandb raise their own kinds
            setattr(self, sink, False if sink == "jsonl" else None)
            if not quiet:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                log.warning(f"{what} cannot be written ({type(exc).__name__}: {reason}); "
                            "logging there stops, training goes on")

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` (with a `step`) to metrics.jsonl, and its finite numbers to TensorBoard
        and W&B as `train/KEY` (`val/KEY` for keys starting with val). Rank 0 only; no-op elsewhere."""
        if not self.enabled:
            return
        if self.jsonl:
            with self._guard("jsonl", str(self.path)), self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {(f"train/{key}" if not key.startswith("val") else f"val/{key}"): value
                   for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and value == value}
        self.last.update(scalars)
        if self.tb is not None:
            with self._guard("tb", "TensorBoard events"):
                for key, value in scalars.items():
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None and scalars:
            with self._guard("wandb", "Weights & Biases"):
                self.wandb.log(scalars, step=step)

    def spectral(self, step: int, snapshot: dict[str, np.ndarray], init_freq: np.ndarray,
                 n_head: int | None = None) -> None:
        """TensorBoard histograms of a `spectral_snapshot` (finite values only) and, with spectral
        heads, the `frequency_figure` against `init_freq`; arguments as those take them."""
        if not (self.enabled and self.tb is not None and snapshot):
            return
        with self._guard("tb", "TensorBoard events"):
            for name, values in snapshot.items():
                short = name.replace("blocks.", "layer").replace(".attn.position.", "/")
                finite = values[np.isfinite(values)]  # a diverged run must still log what it can
                if finite.size:
                    self.tb.add_histogram(f"spectral/{short}", finite, step)
            if any(k.endswith(".omega") for k in snapshot):
                import matplotlib.pyplot as plt

                fig = frequency_figure(snapshot, init_freq, n_head)
                try:
                    self.tb.add_figure("spectral/frequencies_vs_rope", fig, step)
                finally:
                    plt.close(fig)

    def close(self, quiet: bool = False) -> None:
        """Flush and close every destination; `quiet` (the run is already failing with its own
        error) drops a failing one without a warning."""
        if self.tb is not None:
            with self._guard("tb", "TensorBoard events", quiet):
                # The run's hyperparameters against its final numbers (HPARAMS tab); not where the
                # run directory vanished (add_hparams opens a new writer, which would recreate it).
                if self.config and Path(self.tb.log_dir).is_dir():
                    final = {f"hparam/{k.split('/')[-1]}": v for k, v in self.last.items()
                             if k.endswith(("/loss", "/val_loss", "/val_ppl"))}
                    self.tb.add_hparams(flat_hparams(self.config), final, run_name=".")
                self.tb.flush()
                self.tb.close()
        if self.wandb is not None:
            with self._guard("wandb", "Weights & Biases", quiet):
                self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN/metrics.jsonl in order ([] without the file)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: str | Path) -> Path | None:
    """Write RUN/loss.png, training and validation loss (nats/token) against step; returns its path,
    None when there are no metrics."""
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
