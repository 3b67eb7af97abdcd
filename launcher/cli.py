"""The `bifocal` command: parses arguments and dispatches, nothing else.

Handlers are imported lazily (torch and deepspeed take seconds to import) so `bifocal --help`
is instant. Each handler is `module:function(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from bifocal import __version__, configs
from bifocal.core import logs
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.synthetic import TASKS
from bifocal.model.schemes import SCHEMES


def _add_set(p: argparse.ArgumentParser, what: str = "a config value") -> None:
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"override {what}, e.g. --set train.max_steps=100 optim.lr=1e-3 (repeatable)")


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML config (default: the embedded demo)")
    _add_set(p)


def _prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize corpora into packed token shards")
    p.add_argument("config", nargs="?", default=None, help="YAML config with a data: section (default: demo)")
    p.add_argument("--out", default=None, help="output directory (default: data.prepared_dir)")
    _add_set(p)
    p.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.set_defaults(handler="bifocal.launcher.commands:prepare")


def _train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with a DeepSpeed engine (one process or many)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--run-dir", default=None, help="run directory (default: train.out_dir/train.run_name)")
    p.add_argument("--init-from-hf", default=None, metavar="DIR",
                   help="continue pretraining a local Hugging Face Llama-family model, spectralized")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start from another run's weights with this config (context extension: e.g. --set "
                        "model.max_seq_len=1024); fresh optimizer and schedule (= --set train.init_from=RUN)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="with --init-from: the parent's checkpoint at step N (default: its newest)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file, includes, --set applied) as YAML and exit; nothing is trained")
    p.epilog = "Every config key, its default and what it does: `bifocal config` (or `bifocal config train`)."
    p.set_defaults(handler="bifocal.launcher.train:main")


def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="training throughput, MFU and memory of every position scheme, side by side",
                       description="Times the `bifocal train` step (DeepSpeed engine, data loader, optimizer) of a "
                                   "run config for each scheme in turn, blocks of steps round-robin, and prints "
                                   "tokens/s, MFU, peak memory and ratios to rope. The run is set as for `bifocal "
                                   "train`: --config gpu/125m --set model.max_seq_len=2048 train.micro_batch=8 "
                                   "deepspeed.precision=bf16 train.compile=true. See docs/performance.md.")
    _add_config_args(p)
    from bifocal.core.settings import add_arguments
    from bifocal.launcher.settings import BenchSettings

    add_arguments(p, BenchSettings)
    p.set_defaults(handler="bifocal.launcher.bench:main")


def _config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list the config keys with their defaults and descriptions")
    p.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. train or model.position")
    p.set_defaults(handler="bifocal.launcher.commands:list_config_keys")


def _launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", help="run `bifocal train` under the deepspeed launcher (multi-GPU / multi-node)",
        description="bifocal launch [deepspeed launcher options] -- [train options]",
    )
    p.add_argument("launcher_args", nargs=argparse.REMAINDER)
    p.set_defaults(handler="bifocal.launcher.launch:main")


def _eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, passkey, reports, spectral inspection")
    esub = p.add_subparsers(dest="eval_command", required=True)

    from bifocal.core.settings import add_arguments

    # The declarations live with the commands, in the eval layer, which the launcher does not import:
    # they are named like the handlers and loaded when the parser is built.
    PplSettings, ReportSettings, PasskeySettings, SpectrumSettings, TasksSettings = (
        _resolve(f"bifocal.eval.settings:{name}") for name in
        ("PplSettings", "ReportSettings", "PasskeySettings", "SpectrumSettings", "TasksSettings"))

    ppl = esub.add_parser("ppl", help="perplexity at several context lengths")
    ppl.add_argument("model", help="run directory or exported model directory")
    add_arguments(ppl, PplSettings)
    ppl.set_defaults(handler="bifocal.eval.perplexity:main")

    rep = esub.add_parser("report", help="collect results into report.md and extrapolation.png")
    rep.add_argument("results", nargs="+", help="result JSON files or directories holding them")
    add_arguments(rep, ReportSettings)
    rep.set_defaults(handler="bifocal.eval.report:main")

    pk = esub.add_parser("passkey", help="passkey retrieval accuracy against context length")
    pk.add_argument("model", help="run directory or exported model directory")
    add_arguments(pk, PasskeySettings)
    pk.set_defaults(handler="bifocal.eval.passkey:main")

    sp = esub.add_parser("spectrum", help="learned Omega, A, Phi against the RoPE initialisation")
    sp.add_argument("model", help="run directory or exported model directory")
    add_arguments(sp, SpectrumSettings)
    sp.set_defaults(handler="bifocal.eval.spectrum:main")

    tk = esub.add_parser("tasks", help="algorithmic tasks: loss and exact match in/out of distribution")
    tk.add_argument("model", help="run directory or exported model directory")
    add_arguments(tk, TasksSettings)
    tk.set_defaults(handler="bifocal.eval.tasks_eval:main")


def _study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="multi-run studies")
    ssub = p.add_subparsers(dest="study_command", required=True)
    ex = ssub.add_parser("extrapolation", help="train rope/bifocal/spectral/pope, evaluate 1x-16x, report")
    presets = " | ".join(n.split("/")[-1] for n in configs.bundled("study"))
    ex.add_argument("--preset", default="cpu", help=f"{presets} | path to a study YAML")
    ex.add_argument("--out", default="runs/study", help="study directory")
    _add_set(ex, "the study's base run config")
    ex.add_argument("--schemes", default=None, help="comma-separated subset of schemes")
    ex.add_argument("--seeds", type=int, default=None,
                    help="train every scheme with N seeds (train.seed, +1, ...); report mean ± std")
    ex.add_argument("--label", default=None,
                    help="tag result rows scheme[LABEL] (ablations reported beside the main study)")
    ex.set_defaults(handler="bifocal.eval.study:main")

    ext = ssub.add_parser("extension", help="extend each scheme's runs to a longer context (RoPE also with PI and "
                          "YaRN fine-tuning), evaluate L/4-32L, report")
    ext.add_argument("--preset", default="cpu-extension", help="cpu-extension | gpu-125m-extension | path to a "
                     "study YAML with an extension: section")
    ext.add_argument("--out", default="runs/study-extension", help="study directory (a base study's directory "
                     "reuses its runs)")
    _add_set(ext, "the study's base run config")
    ext.add_argument("--schemes", default=None, help="comma-separated subset of schemes")
    ext.add_argument("--seeds", type=int, default=None, help="every scheme with N seeds; report mean ± std")
    ext.set_defaults(handler="bifocal.eval.study_extension:main")

    tks = ssub.add_parser("tasks", help="train the schemes on an algorithmic task, evaluate in/out of distribution")
    tks.add_argument("--task", required=True, choices=list(TASKS))
    tks.add_argument("--schemes", default=None, help=f"comma-separated, of {', '.join(SCHEMES)} (default: all but nope)")
    tks.add_argument("--steps", type=int, default=None, help="training steps per scheme (default: the task config)")
    tks.add_argument("--out", default=None, help="study directory (default: runs/study-tasks-TASK)")
    tks.add_argument("--n", type=int, default=200, help="evaluation examples per setting")
    tks.add_argument("--seed", type=int, default=1, help="evaluation example seed")
    tks.add_argument("--seeds", type=int, default=None,
                     help="train every scheme with N seeds (train.seed, +1, ...; runs named <scheme>-s<seed>); "
                          "report mean ± std")
    _add_set(tks, "the task config for every run")
    tks.set_defaults(handler="bifocal.eval.study_tasks:main")


def _export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidate a checkpoint into a Hugging Face directory")
    p.add_argument("run", help="run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--context", type=int, default=None,
                   help="intended context, the max_length lm-eval and generation read (default: the training "
                        "length, or original x factor for a rope model with scaling)")
    p.set_defaults(handler="bifocal.launcher.export:main")


def _generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a run or an exported model")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step")
    p.add_argument("--device", default=None)
    p.set_defaults(handler="bifocal.eval.generate:main")


def _estimate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="memory per rank, the largest micro-batch that fits and tokens/s of a run "
                                        "config on a named GPU, without one")
    _add_config_args(p)
    p.add_argument("--device", default="h100-80gb", help="GPU model and memory, e.g. h100-80gb, a100-40gb (an "
                                                         "unknown name lists them all)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel ranks (ZeRO partitions over them)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for tokens/s")
    p.set_defaults(handler="bifocal.launcher.estimate:main")


def _env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="versions of bifocal, Python, torch, DeepSpeed, transformers, ... and the "
                                   "device (paste into bug reports)")
    p.set_defaults(handler="bifocal.launcher.commands:env")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bifocal",
        description="Pretrain GPT-style models with bifocal attention on DeepSpeed.",
    )
    parser.add_argument("--version", action="version", version=f"bifocal {__version__}")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="warning",
                       help="log warnings and errors only (the command's output is printed as always)")
    level.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                       help="log debug lines too")
    level.add_argument("--log-level", choices=list(logs.LEVELS),
                       help=f"log level (default: ${logs.LEVEL_ENV}, else info)")
    parser.add_argument("--log-ranks", default=None, metavar="RANKS",
                        help=f"ranks that log: all, or e.g. 0,1 (default: ${logs.RANKS_ENV}, else 0); with more "
                             "than one rank every line starts with [rankN]:")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_prepare, _train, _config, _bench, _estimate, _launch, _eval, _study, _export, _generate, _env):
        add(sub)
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher inserts --local_rank=N before the subcommand; LOCAL_RANK says the same.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    command = 0  # the command's index, after the top-level options
    while command < len(argv) and argv[command].startswith("-"):
        command += 1 + (argv[command] in ("--log-level", "--log-ranks"))
    if argv[command:command + 1] == ["launch"] and argv[command + 1:command + 2] not in (["-h"], ["--help"]):
        # argparse cannot hand leading `--options` to a REMAINDER positional: pass them verbatim.
        args = build_parser().parse_args(argv[:command + 1])
        args.launcher_args = argv[command + 1:]
    else:
        args = build_parser().parse_args(argv)
    try:
        logs.setup(args.log_level, args.log_ranks)
        return int(_resolve(args.handler)(args) or 0)
    except BifocalError as exc:
        print(f"bifocal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bifocal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
