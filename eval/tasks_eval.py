"""`bifocal eval tasks`: exact match and answer loss on an algorithmic task, in and out of
the training distribution.

For every setting of `synthetic.eval_settings(task)` a fixed-seed set of examples is generated.
Each prompt is fed after an end-of-document token (where a training document starts), the answer
is decoded greedily (KV cache) until a newline or end-of-document, and scored with the task's own
verifier. The loss is the mean cross-entropy of the reference answer tokens, teacher-forced.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bifocal.data_pipeline.synthetic import Example, check_answer, eval_settings, generate_examples
from bifocal.data_pipeline.tokenizer import TextTokenizer
from bifocal.model import GPT
from bifocal.model.loss import cross_entropy

from .describe import default_out, model_name, model_scheme, train_len
from .generate import generate
from .results import EvalResult


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
    """{"n", "loss", "exact_match"} over `examples`."""
    nl = newline_token(tok)
    eod_text = tok.decode([tok.eod_id])
    nll, count, correct = 0.0, 0, 0
    for ex in tqdm(examples, desc=desc, leave=False, mininterval=1.0):
        enc = encode(tok, ex)
        s, n = answer_nll(model, enc)
        nll, count = nll + s, count + n
        correct += score(task, ex.prompt, greedy_answer(model, tok, enc, nl), eod_text)
    return {"n": len(examples), "loss": nll / max(count, 1), "exact_match": correct / max(len(examples), 1)}


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
            return {k: v for k, v in syn.items() if k not in ("task", "n_documents", "seed", "per_doc")}
    return {}


def evaluate_task(model: GPT, tok: TextTokenizer, task: str, n: int, seed: int,
                  params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per setting of `eval_settings(task, params)`: in-distribution first."""
    rows = []
    for split, setting, setting_params in eval_settings(task, params):
        examples = generate_examples(task, n, seed, **setting_params)
        row = evaluate_setting(model, tok, task, examples, desc=f"{task} {split}: {setting}")
        rows.append({"split": split, "setting": setting, **row})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'split':<6} {'setting':<14} {'n':>5} {'loss':>8} {'exact':>7}"]
    for r in rows:
        loss = f"{r['loss']:.3f}" if math.isfinite(r["loss"]) else str(r["loss"])
        lines.append(f"{r['split']:<6} {r['setting']:<14} {r['n']:>5} {loss:>8} {r['exact_match']:>7.3f}")
    return "\n".join(lines)


def run(model_path: str | Path, task: str, n: int = 200, seed: int = 1, device: str | None = None,
        out: str | Path | None = None, train_seed: int | None = None,
        model_label: str | None = None) -> tuple[EvalResult, Path]:
    """Evaluate the model at `model_path` on `task` (`seed`: the examples' seed; `train_seed`, if
    given, is recorded so a report averages over training seeds); write and return the result.
    `model_label` names the report row (default: the run directory's name); the runs of one scheme
    with different seeds share it, so the report averages them instead of listing each run."""
    from .loading import load_model

    if n < 1:
        from bifocal.core.errors import BifocalError

        raise BifocalError(f"--n must be >= 1, got {n}")
    model, tok = load_model(model_path, device=device)
    rows = evaluate_task(model, tok, task, n, seed, training_params(model_path, task))
    result = EvalResult(kind="tasks", model=model_label or model_name(model_path), scheme=model_scheme(model), rows=rows,
                        train_len=train_len(model), extra={"task": task, "seed": seed})
    if train_seed is not None:
        result.extra["train_seed"] = train_seed
    path = Path(out) if out else default_out(model_path, f"tasks-{task}.json")
    result.save(path)
    return result, path


def main(args: argparse.Namespace) -> int:
    result, path = run(args.model, args.task, n=args.n, seed=args.seed, device=getattr(args, "device", None),
                       out=args.out)
    print(f"task {args.task}: {result.model} ({result.scheme})")
    print(format_table(result.rows))
    print(f"wrote {path}")
    return 0
