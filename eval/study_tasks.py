"""`bifocal study tasks`: train every position scheme on one algorithmic task with the same data,
budget and seed, evaluate each in and out of distribution, and write one report.

Layout of OUT (default runs/study-tasks-TASK), <run> = the scheme, or <scheme>-s<seed> with
`--seeds N` (training seeds train.seed, +1, ...; the report gives mean ± std):
  data/                  the prepared task data, shared by all runs
  runs/<run>/            one `bifocal train` run per scheme and seed (finished runs are reused), logs/train-<run>.log
  results/<run>.json     `bifocal eval tasks` results
  spectrum/<run>/        learned frequencies against 2*pi/p (modular, schemes with spectral heads)
  report.md, report.json, tasks.png
"""

from __future__ import annotations

import argparse
from pathlib import Path


from bifocal import configs
from bifocal.core import logs
from bifocal.core.errors import BifocalError
from bifocal.model.schemes import SCHEMES, studied

from .results import EvalResult
from .study import run_names, train_run

log = logs.get_logger(__name__)



def task_config(task: str) -> Path:
    path = configs.ROOT / "tasks" / f"{task}.yaml"
    if not path.is_file():
        raise BifocalError(f"no task config {path}")
    return path


def train_scheme(task: str, scheme: str, out: Path, steps: int | None, overrides: list[str],
                 seed: int | None = None, name: str | None = None) -> Path:
    """Train (or finish, or reuse) OUT/runs/<name> on the task's config with the study's runner."""
    from bifocal.run.config import load_config

    name = name or scheme
    cfg_path = task_config(task)
    sets = [f"model.position.scheme={scheme}", f"train.run_name={name}",
            f"data.prepared_dir={(out / 'data').resolve()}", *overrides]
    if steps is not None:
        sets.append(f"train.max_steps={steps}")
    if seed is not None:
        sets.append(f"train.seed={seed}")
    return train_run(cfg_path, out, name, load_config(cfg_path, sets).train.max_steps, sets)


def modulus_of(task: str, overrides: list[str]) -> int | None:
    """The task's modulus p (modular, count), whose k*2*pi/p the spectral heads are measured
    against; None for tasks without one."""
    from bifocal.data_pipeline.synthetic import DEFAULTS

    if "p" not in DEFAULTS[task]:
        return None
    from bifocal.run.config import load_config

    src = load_config(task_config(task), overrides).data.sources[0].synthetic or {}
    return int(src.get("p", DEFAULTS[task]["p"]))


NULL_MODULI = range(3, 9)  # the task's p and moduli it never used, as the null for a lock-on
NEAR = 0.05  # rad/token: "within" a target


def null_section(spectra: dict[str, dict], p: int) -> str:
    """Markdown: is k*2*pi/p special to the learned frequencies? For each modulus q in NULL_MODULI
    (the task's p and, as a null, moduli the task never used), over all spectral heads of all runs:
    the median circular distance from a head's closest frequency pair to the nearest k*2*pi/q
    (k = 1..q-1), the heads within NEAR, and the heads closer than at the RoPE initialisation.
    A lock-on shows as p standing out from its neighbours; more targets (larger q) cover more of
    the circle, so the null distance falls with q by itself."""
    import statistics

    import numpy as np

    from .spectrum import nearest_to_modulus

    heads = [h for result in spectra.values() for h in result.get("spectral_heads") or []]
    if not heads:
        return ""
    lines = [f"## Is 2pi/{p} special? The task's modulus against moduli it never used", "",
             f"{len(heads)} spectral heads of {len(spectra)} run(s). Read each count against its initial value "
             "(last column, and the init distances): RoPE's theta_0 = 1 rad/token already sits 0.047 from 2pi/6.", "",
             "| modulus q | targets k*2pi/q | median distance | heads within 0.05 | closer than at init | median init distance |",
             "|---:|---:|---:|---:|---:|---:|"]
    for q in sorted({*NULL_MODULI, p}):
        d = [nearest_to_modulus(np.asarray(h["omega"]), q)["distance"] for h in heads]
        d0 = [nearest_to_modulus(np.asarray(h["theta"]), q)["distance"] for h in heads]
        lines.append(f"| {q}{' (the task)' if q == p else ''} | {q - 1} | {statistics.median(d):.3f} | "
                     f"{sum(x < NEAR for x in d)} of {len(d)} | {sum(a < b for a, b in zip(d, d0))} of {len(d)} | "
                     f"{statistics.median(d0):.3f} |")
    return "\n".join(lines) + "\n"


def frequency_section(out: Path, spectra: dict[str, dict]) -> str:
    """Markdown: per spectral head, the learned frequency nearest k*2*pi/p, against init."""
    lines = []
    for scheme, result in spectra.items():
        mod = result.get("modulus")
        if not mod:
            continue
        if not lines:
            lines += [f"## Learned frequencies against k*2pi/{mod['p']}", "",
                      f"2pi/{mod['p']} = {mod['target']:.4f} rad/token. Distance on the circle from the nearest "
                      "k*2pi/p, for the closest frequency pair of each spectral head, after training and at "
                      "the RoPE initialisation.", "",
                      "| run | head | pair | Omega | k | distance | init distance |",
                      "|---|---|---:|---:|---:|---:|---:|"]
        for r in mod["heads"]:
            lines.append(f"| {scheme} | L{r['layer']} h{r['head']} | {r['pair']} | {r['omega']:.4f} | {r['k']} | "
                         f"{r['distance']:.4f} | {r['init_distance']:.4f} |")
    return "\n".join(lines) + "\n" if lines else ""


def seed_runs(task: str, schemes: list[str], seeds: int | None, overrides: list[str]) -> list[tuple[str, int, str]]:
    """(scheme, training seed, run name), named as every study names its runs (study.run_names).
    The seed is always given (the config's when the study names none), so results of separate
    studies combine in one report."""
    from bifocal.run.config import load_config

    first = load_config(task_config(task), overrides).train.seed
    return [(s, first if seed is None else seed, name)
            for s, seed, name in run_names(schemes, [first + i for i in range(seeds)] if seeds else [])]


def run_study(task: str, schemes: list[str], out: Path, steps: int | None, n: int, seed: int,
              overrides: list[str], seeds: int | None = None) -> dict[str, Path]:
    from bifocal.run import train_process

    from . import spectrum, tasks_eval
    from .report import write_report
    from .results import load

    results: list[EvalResult] = []
    spectra: dict[str, dict] = {}
    p = modulus_of(task, overrides)
    for scheme, train_seed, name in seed_runs(task, schemes, seeds, overrides):
        run_dir = train_scheme(task, scheme, out, steps, overrides, train_seed, name)
        res_path = out / "results" / f"{name}.json"
        settings = {"task": task, "n": n, "seed": seed, "train_seed": train_seed,
                    "step": train_process.finished_step(run_dir)}
        # The same rule as the extrapolation study: a result is reused when it was made with the
        # same settings from the same trained step (and predates nothing: it counts held-out prompts).
        current = res_path.is_file() and load(res_path).extra.get("settings") == settings
        if current:
            log.info(f"{name}: result is current, reusing it")
            results.append(load(res_path))
        else:
            log.info(f"{name}: evaluating")
            result, _ = tasks_eval.run(run_dir, task, n=n, seed=seed, out=res_path, train_seed=train_seed,
                                      model_label=scheme, settings=settings)
            results.append(result)
        print(tasks_eval.format_table(results[-1].rows), flush=True)
        if p is not None and SCHEMES[scheme].spectral != "none":
            spectra[name], _ = spectrum.run(run_dir, out=out / "spectrum" / name, modulus=p)
    paths = write_report(results, out)
    section = frequency_section(out, spectra)
    if p is not None:
        section += ("\n" if section else "") + null_section(spectra, p)
    if section:
        with paths["markdown"].open("a") as f:
            f.write("\n" + section)
    return paths


def main(args: argparse.Namespace) -> int:
    schemes = [s.strip() for s in (args.schemes or ",".join(studied())).split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise BifocalError(f"--schemes: unknown scheme(s) {', '.join(bad) or '(none)'}; "
                           f"choose from {', '.join(SCHEMES)}")
    if args.steps is not None and args.steps < 1:
        raise BifocalError(f"--steps must be >= 1, got {args.steps}")
    if args.seeds is not None and args.seeds < 1:
        raise BifocalError(f"--seeds must be >= 1, got {args.seeds}")
    out = Path(args.out or f"runs/study-tasks-{args.task}")
    paths = run_study(args.task, schemes, out, args.steps, args.n, args.seed, list(args.overrides), args.seeds)
    print(paths["markdown"].read_text())
    for path in paths.values():
        print(f"wrote {path}")
    return 0
