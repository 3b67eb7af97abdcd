"""Every check `bifocal train` can make before it writes anything into the run directory.

A refused `--resume` must leave the run exactly as it was (its tokenizer/ and config.yaml are what
`generate` and `eval` read later), and a run must not train for hours to fail at its first
validation. So the data's tokenizer, the config changes a resume asks for, the checkpoint files
and the validation data are all checked here, on rank 0, before the first write.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from bifocal.core import logs
from bifocal.core.config import flatten
from bifocal.core.errors import BifocalError
from bifocal.run import checkpoint, safe_load
from bifocal.run.config import RunConfig, load_config

log = logs.get_logger(__name__)

# What a checkpoint cannot follow: the model's shape and position scheme, the data and its order,
# and how DeepSpeed laid out the saved states. Everything else (schedule, optimizer
# hyperparameters, batch split, cadence, evaluation) is applied on resume and logged; the batch
# split only at the same global batch (check_global_batch).
FROZEN_ON_RESUME = ("model.", "data.", "train.seed", "deepspeed.zero_stage",
                    "deepspeed.precision")


# Directories a config names that save_config writes absolute: the same directory is no change.
PATH_KEYS = ("data.prepared_dir", "train.out_dir", "train.init_from")


def config_changes(before: RunConfig, after: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, value the run had, value asked for now) for every differing key."""
    old, new = flatten(before.to_dict()), flatten(after.to_dict())
    if after.vocab_from_data:  # the data decides the vocabulary, as it did when the run started
        new["model.vocab_size"] = old.get("model.vocab_size")
    for key in PATH_KEYS:  # config.yaml holds them absolute; a config may give them relative to here
        for flat in (old, new):
            if isinstance(flat.get(key), str):
                flat[key] = str(Path(flat[key]).expanduser().resolve())
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_resume(run_dir: Path, cfg: RunConfig, data, from_hf: bool, world: int = 1) -> list[tuple[str, Any, Any]]:
    """Refuse a resume that cannot continue this run (on `world` ranks); return the changes it will apply."""
    found = checkpoint.latest_checkpoint(run_dir)
    if found is None:
        return []
    # Checked now rather than when DeepSpeed reads them, so a refused file leaves nothing written.
    safe_load.verify(safe_load.checkpoint_files(found[1]))
    recorded = checkpoint.marker_info(found[1]).get("tokenizer_hash")
    if recorded is None and (run_dir / "tokenizer").is_dir():
        from bifocal.data_pipeline.tokenizer import load_tokenizer

        recorded = load_tokenizer(run_dir / "tokenizer").hash
    if recorded is not None and recorded != data.tokenizer_hash:
        raise BifocalError(f"{data.path} was prepared with another tokenizer than the run {run_dir} "
                           f"(hash {data.tokenizer_hash[:12]} != {recorded[:12]}); resume with the run's own data "
                           f"(nothing was written)")
    if not (run_dir / "config.yaml").is_file():
        return []
    before = load_config(run_dir / "config.yaml")
    check_global_batch(before, cfg, int(checkpoint.marker_info(found[1]).get("world_size", 1)), world, run_dir)
    changes = config_changes(before, cfg)
    frozen = [c for c in changes if c[0].startswith(FROZEN_ON_RESUME) and not (from_hf and c[0].startswith("model."))]
    if frozen:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in frozen[:3]) + (" ..." if len(frozen) > 3 else "")
        raise BifocalError(f"--resume cannot change {shown}: the checkpoint in {run_dir} was trained with the "
                           f"first value; start a new run for that (nothing was written)")
    return changes


# The model settings a run started from another may change: the context length, how the fixed-
# frequency heads scale to it, and dropout; everything else shapes the weights or what they mean.
EXTENSIBLE = ("model.max_seq_len", "model.position.rope_scaling", "model.dropout")


def check_init_from(cfg: RunConfig, data) -> tuple[int, Path]:
    """The parent checkpoint (step, path) of `train.init_from` / `train.init_step`, refused with one
    line (nothing written) when this run cannot start from it: not a run, no such checkpoint, a
    continued Hugging Face model, another tokenizer, another scheme or other weight shapes."""
    parent = Path(cfg.train.init_from)
    where = f"train.init_from {parent}"
    if not (parent / "config.yaml").is_file():
        raise BifocalError(f"{where}: not a bifocal run directory (no config.yaml)")
    if (parent / "init_from_hf.json").is_file():
        raise BifocalError(f"{where}: it continued a Hugging Face model; export it and use --init-from-hf")
    found = checkpoint.latest_checkpoint(parent, cfg.train.init_step)
    if found is None:
        at = f"at step {cfg.train.init_step}" if cfg.train.init_step is not None else "at all"
        steps = ", ".join(str(s) for s, _ in checkpoint.complete_checkpoints(parent)) or "none"
        raise BifocalError(f"{where}: no complete checkpoint {at} (complete: {steps})")
    safe_load.verify(safe_load.checkpoint_files(found[1]))
    recorded = checkpoint.marker_info(found[1]).get("tokenizer_hash")
    if recorded is not None and recorded != data.tokenizer_hash:
        raise BifocalError(f"{where}: trained with another tokenizer (hash {recorded[:12]}) than {data.path} "
                           f"({data.tokenizer_hash[:12]}); prepare the data with the parent's tokenizer")
    try:
        before = load_config(parent / "config.yaml")
    except BifocalError as exc:
        raise BifocalError(f"{parent / 'config.yaml'}: {exc}") from None
    if before.model.position.scheme != cfg.model.position.scheme:
        raise BifocalError(f"{where}: a {before.model.position.scheme} run; this run's scheme is "
                           f"{cfg.model.position.scheme} (extend a run of the same scheme)")
    old, new = flatten(before.to_dict()["model"], "model."), flatten(cfg.to_dict()["model"], "model.")
    if cfg.vocab_from_data:  # the data decides the vocabulary (the parent's config.yaml holds its own)
        new["model.vocab_size"] = data.vocab_size
    differ = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
              if old.get(k) != new.get(k) and not k.startswith(EXTENSIBLE)]
    if differ:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ[:3]) + (" ..." if len(differ) > 3 else "")
        raise BifocalError(f"{where}: other model settings ({shown}); only {', '.join(EXTENSIBLE)} may differ")
    return found


def check_global_batch(before: RunConfig, after: RunConfig, saved_world: int, world: int, run_dir: Path) -> None:
    """A resume may split the global batch (micro_batch x grad_accum x ranks) differently, which
    continues the same windows at every step (loader.py) and the same token count (step x tokens
    per step); it may not change the global batch, which would not continue the same data order."""
    a, b = before.train, after.train
    # The ranks of a sequence-parallel group read the same windows: count data-parallel ranks.
    saved_world, world = saved_world // a.sequence_parallel, world // b.sequence_parallel
    saved, now = a.micro_batch * a.grad_accum * saved_world, b.micro_batch * b.grad_accum * world
    if saved == now:
        return
    per_rank = saved // world
    ranks = f"{world} rank{'s' if world > 1 else ''}"
    hint = (f"e.g. train.micro_batch={per_rank // b.grad_accum} on {ranks}" if saved % world == 0 and
            per_rank % b.grad_accum == 0 else f"e.g. train.micro_batch={per_rank} train.grad_accum=1 on {ranks}"
            if saved % world == 0 else f"on a number of ranks that divides {saved}")
    raise BifocalError(f"--resume cannot change the global batch (micro_batch x grad_accum x ranks: {a.micro_batch} x "
                       f"{a.grad_accum} x {saved_world} = {saved} in {run_dir}, now {b.micro_batch} x {b.grad_accum} x "
                       f"{world} = {now}): the data order continues only at {saved} windows a step; {hint} "
                       f"(nothing was written)")


def check_validation(cfg: RunConfig, data, rank: int, world: int) -> bool:
    """Whether the run validates: data.val_fraction=0 asks for no validation (a warning); otherwise
    the validation split must hold at least one window, checked before step 1."""
    from bifocal.data_pipeline.loader import WindowSampler

    if cfg.data.val_fraction == 0:
        log.warning("data.val_fraction=0: training without validation")
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sources too small for a window: reported below if none fits
            WindowSampler(data, "val", cfg.model.max_seq_len, cfg.train.micro_batch, rank=rank, world_size=world)
    except BifocalError:
        raise BifocalError(f"{data.path} has {data.num_tokens('val') if 'val' in data.splits else 0} validation "
                           f"tokens, not one window of seq_len + 1 = {cfg.model.max_seq_len + 1} in any source; add "
                           f"documents, raise data.val_fraction, or set data.val_fraction=0 to train without "
                           f"validation (nothing was written)") from None
    return True
