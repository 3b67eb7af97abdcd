"""`bifocal eval tasks`: exact match and answer loss on an algorithmic task, on instances held out
of training, in and out of the training distribution, and beyond the training length.

For every setting of `synthetic.eval_settings(task)`, plus one whose prompts alone are longer than
the training context (`beyond_setting`), a fixed-seed set of examples is drawn from the side of
`synthetic.held_out` the setting names: held-out instances everywhere except the "train" recall
control. Every test prompt is looked up in the run's prepared documents (train and validation
splits): a held-out setting with any prompt found there is an error, and each row counts them
(`train_overlap`) with its distinct prompts. Each prompt is fed after an end-of-document token
(where a training document starts), the answer is decoded greedily (KV cache) until a newline or
end-of-document, and scored with the task's own verifier. The loss is the mean cross-entropy of the
reference answer tokens, teacher-forced.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bifocal.core import logs
from bifocal.core.errors import BifocalError
from bifocal.data_pipeline.synthetic import (DEFAULTS, HELD_OUT_FRACTION, Example, check_answer, eval_settings,
                                             generate_examples, prompt_of, side_of)
from bifocal.data_pipeline.tokenizer import TextTokenizer
from bifocal.model import GPT
from bifocal.model.loss import cross_entropy

from .describe import default_out, model_name, model_scheme, train_len
from .generate import generate
from .results import EvalResult

log = logs.get_logger(__name__)


@dataclass
class Encoded:
    prompt: list[int]  # EOD + prompt tokens
    answer: list[int]  # reference answer tokens (leading space included)


def encode(tok: TextTokenizer, ex: Example) -> Encoded:
    # Encoded apart: the byte-level pre-tokenizer splits at " <answer>" anyway, so prompt + answer
    # tokens equal the tokens of the whole line, and the answer boundary is exact.
    return Encoded([tok.eod_id] + tok.encode(ex.prompt), tok.encode(ex.answer))


def cut_answer(generated: str, eod_text: str | None = None) -> str:
    """The answer part of a continuation: everything before the first newline or end-of-document."""
    if eod_text:
        generated = generated.split(eod_text, 1)[0]
    return generated.split("\n", 1)[0]


def score(task: str, prompt: str, generated: str, eod_text: str | None = None) -> bool:
    """Whether the model's continuation of `prompt` answers it correctly (exact match up to spaces)."""
    return check_answer(task, prompt, cut_answer(generated, eod_text))


@torch.no_grad()
def answer_nll(model: GPT, enc: Encoded) -> tuple[float, int]:
    """(summed cross-entropy of the reference answer tokens given the prompt, token count)."""
    device = next(model.parameters()).device
    ids = torch.tensor([enc.prompt + enc.answer], device=device)
    logits, _ = model(ids[:, :-1])
    start = len(enc.prompt) - 1  # the logit at the last prompt token predicts the first answer token
    pred = logits[0, start:].float()
    target = ids[0, len(enc.prompt):]
    return float(cross_entropy(pred, target, reduction="sum")), int(target.numel())


def greedy_answer(model: GPT, tok: TextTokenizer, enc: Encoded, newline_id: int | None) -> str:
    """Greedy continuation (KV cache), long enough for the reference answer plus slack."""
    budget = 2 * len(enc.answer) + 2  # a different but valid tokenisation may take more tokens
    out = generate(model, torch.tensor([enc.prompt]), budget, greedy=True, eos_id=newline_id)
    return tok.decode(out[0, len(enc.prompt):].tolist())


def newline_token(tok: TextTokenizer) -> int | None:
    ids = tok.encode("\n")
    return ids[0] if len(ids) == 1 else None


def evaluate_setting(model: GPT, tok: TextTokenizer, task: str, examples: list[Example],
                     desc: str = "") -> dict[str, Any]:
    """{"n", "loss", "exact_match", "distinct", "min_tokens", "max_tokens"} over `examples`
    (tokens: of `<EOD> prompt`, the context the first answer token is predicted from)."""
    nl = newline_token(tok)
    eod_text = tok.decode([tok.eod_id])
    nll, count, correct, lengths = 0.0, 0, 0, []
    for ex in logs.progress(examples, desc=desc, unit="examples", lines=1, log=log, leave=False, mininterval=1.0):
        enc = encode(tok, ex)
        s, n = answer_nll(model, enc)
        nll, count = nll + s, count + n
        correct += score(task, ex.prompt, greedy_answer(model, tok, enc, nl), eod_text)
        lengths.append(len(enc.prompt))
    return {"n": len(examples), "loss": nll / max(count, 1), "exact_match": correct / max(len(examples), 1),
            "distinct": len({ex.prompt for ex in examples}), "min_tokens": min(lengths, default=0),
            "max_tokens": max(lengths, default=0)}


def training_params(model_path: str | Path, task: str) -> dict[str, Any]:
    """The task parameters (lengths, depth, modulus, ...) the run at `model_path` was trained on:
    those of its config's synthetic source for `task`, or {} (the generator's defaults)."""
    import yaml

    path = Path(model_path) / "config.yaml"
    try:
        sources = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("sources") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    for src in sources:
        syn = src.get("synthetic") if isinstance(src, dict) else None
        if isinstance(syn, dict) and syn.get("task") == task:
            return training_params_of(syn)
    return {}


def training_params_of(synthetic: dict[str, Any]) -> dict[str, Any]:
    """The generator parameters of a `synthetic` source: everything but what sizes the data."""
    return {k: v for k, v in synthetic.items() if k not in ("task", "n_documents", "seed", "per_doc")}


def prepared_prompts(data: str | Path, tok: TextTokenizer) -> set[str]:
    """The prompts of every instance line in the prepared documents at `data` (train and validation
    splits), decoded with `tok`."""
    from bifocal.data_pipeline.loader import PreparedData, iter_documents

    prepared = PreparedData(data)
    return {p for split in prepared.splits for doc in iter_documents(prepared, split)
            for line in tok.decode(doc.tolist()).split("\n") if (p := prompt_of(line))}


def training_prompts(model_path: str | Path, tok: TextTokenizer) -> tuple[set[str], str] | None:
    """(`prepared_prompts` of the run's data.prepared_dir, that directory), or None for a model
    without a run config (an export). Raises BifocalError when the run's prepared data is gone: the
    held-out check needs it."""
    from bifocal.run.config import load_config

    config = Path(model_path) / "config.yaml"
    if not config.is_file():
        return None
    data = Path(load_config(config).data.prepared_dir)
    if not (data / "meta.json").is_file():
        raise BifocalError(f"{data}: the run's prepared data is missing; the held-out check reads it "
                           f"(re-run `bifocal prepare {config}`)")
    return prepared_prompts(data, tok), str(data)


def beyond_setting(task: str, params: dict[str, Any], tok: TextTokenizer, context_len: int) -> tuple[str, str, dict]:
    """("out", label, params): lengths n .. 2n, n the smallest number of symbols at which 16 probe
    instances all have `<EOD> prompt` longer than `context_len` tokens, so every answer token is
    predicted at a position training never reached (tokens grow with symbols: each is its own
    space-separated word). Doubling, then bisection over n."""
    def within(n: int) -> bool:  # n or n + 1: a Dyck length of the wrong parity may be infeasible
        probe = generate_examples(task, 16, 0, **{**params, "min_len": n, "max_len": n + 1})
        return min(len(encode(tok, ex).prompt) for ex in probe) <= context_len

    lo = hi = {**DEFAULTS[task], **params}["max_len"]
    while within(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return "out", f"len {hi}-{2 * hi}, > {context_len} tokens", {**params, "min_len": hi, "max_len": 2 * hi}


def evaluate_task(model: GPT, tok: TextTokenizer, task: str, n: int, seed: int,
                  params: dict[str, Any] | None = None, seen: set[str] | None = None) -> list[dict[str, Any]]:
    """One row per setting of `eval_settings(task, params)` and `beyond_setting`, each drawn from
    its split's side. `seen`: the training prompts; a held-out row with any of them raises
    BifocalError, and every row counts them (`train_overlap`, None when `seen` is None)."""
    params = dict(params or {})
    settings = eval_settings(task, params) + [beyond_setting(task, params, tok, train_len(model))]
    rows = []
    for split, setting, setting_params in settings:
        examples = generate_examples(task, n, seed, side=side_of(split), **setting_params)
        overlap = None if seen is None else sum(ex.prompt in seen for ex in examples)
        if overlap and side_of(split) == "test":
            raise BifocalError(f"{overlap} of {n} held-out prompts of {task} {split}: {setting} occur in the "
                               f"training data: it was prepared before test instances were held out; prepare "
                               f"it again into a new directory and retrain")
        row = evaluate_setting(model, tok, task, examples, desc=f"{task} {split}: {setting}")
        rows.append({"split": split, "setting": setting, **row, "train_overlap": overlap})
    beyond = rows[-1]
    if beyond["min_tokens"] <= train_len(model):  # what the setting's label claims
        raise BifocalError(f"{task} {beyond['setting']}: a prompt has only {beyond['min_tokens']} tokens")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'split':<6} {'setting':<26} {'n':>5} {'distinct':>8} {'seen':>5} {'loss':>8} {'exact':>7}"]
    for r in rows:
        loss = f"{r['loss']:.3f}" if math.isfinite(r["loss"]) else str(r["loss"])
        seen = "-" if r.get("train_overlap") is None else r["train_overlap"]
        lines.append(f"{r['split']:<6} {r['setting']:<26} {r['n']:>5} {r.get('distinct', '-'):>8} {seen:>5} {loss:>8} "
                     f"{r['exact_match']:>7.3f}")
    return "\n".join(lines)


def run(model_path: str | Path, task: str, n: int = 200, seed: int = 1, device: str | None = None,
        out: str | Path | None = None, train_seed: int | None = None,
        model_label: str | None = None, settings: dict | None = None) -> tuple[EvalResult, Path]:
    """Evaluate the model at `model_path` on `task` (`seed`: the examples' seed; `train_seed`, if
    given, is recorded so a report averages over training seeds); write and return the result.
    `model_label` names the report row (default: the run directory's name); the runs of one scheme
    with different seeds share it, so the report averages them instead of listing each run.
    `settings` (a study's) are recorded in the result, which a study reuses while they match."""
    from .loading import load_model

    if n < 1:
        raise BifocalError(f"--n must be >= 1, got {n}")
    model, tok = load_model(model_path, device=device)
    found = training_prompts(model_path, tok)
    seen, data = found if found is not None else (None, None)
    rows = evaluate_task(model, tok, task, n, seed, training_params(model_path, task), seen)
    result = EvalResult(kind="tasks", model=model_label or model_name(model_path), scheme=model_scheme(model), rows=rows,
                        train_len=train_len(model),
                        extra={"task": task, "seed": seed, "held_out_fraction": HELD_OUT_FRACTION,
                               "training_data": data, "training_prompts": None if seen is None else len(seen)})
    if train_seed is not None:
        result.extra["train_seed"] = train_seed
    if settings is not None:
        result.extra["settings"] = settings
    path = Path(out) if out else default_out(model_path, f"tasks-{task}.json")
    result.save(path)
    return result, path


def main(args: argparse.Namespace) -> int:
    from bifocal.core.settings import resolve_arguments

    from .settings import TasksSettings

    args = resolve_arguments(TasksSettings, args, "eval tasks")
    result, path = run(args.model, args.task, n=args.n, seed=args.seed, device=getattr(args, "device", None),
                       out=args.out)
    print(f"task {args.task}: {result.model} ({result.scheme})")
    print(format_table(result.rows))
    if result.extra["training_data"] is None:
        print("no run config: the held-out prompts were not checked against training data (seen: -)")
    else:
        print(f"seen = test prompts found among the {result.extra['training_prompts']} distinct prompts of "
              f"{result.extra['training_data']}; held-out splits (all but train) must have 0")
    print(f"wrote {path}")
    return 0
