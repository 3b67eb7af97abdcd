"""`bifocal estimate`: the activation trace against the CPU allocator of a real forward and
backward, the model states against DeepSpeed's estimators, how the estimate moves with ZeRO stage,
checkpointing and micro-batch, and the command's output and errors."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from bifocal.launcher import cli
from bifocal.launcher.estimate import DTYPES, ActivationTracer, estimate, model_states, usable_bytes
from bifocal.model import GPT, GPTConfig
from bifocal.run.config import load_config

TINY = {"vocab_size": 512, "n_layer": 4, "n_head": 4, "d_model": 64, "max_seq_len": 128}


def allocator_peak(cfg: GPTConfig, dtype: str, micro_batch: int, checkpointing: int) -> int:
    """The most bytes the CPU allocator held beyond the weights and gradients during a real
    training forward + backward: every allocation and free it reports to the profiler, in order.
    (The profiler's raw events are not public API: this fails loudly if they go.)"""
    torch.manual_seed(0)
    model = GPT(cfg).to(DTYPES[dtype]).train()
    model.set_activation_checkpointing(checkpointing)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.max_seq_len))
    model(ids, ids, return_logits=False)[1].backward()  # the gradients exist, as in training

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        model(ids, ids, return_logits=False)[1].backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("micro_batch, seq_len, checkpointing, dtype, scheme", [
    (2, 64, 0, "fp32", "bifocal"),
    (4, 128, 0, "fp32", "bifocal"),
    (4, 128, 1, "fp32", "bifocal"),
    (8, 64, 2, "fp32", "rope"),
    (4, 128, 0, "bf16", "bifocal"),
    (4, 128, 2, "bf16", "bifocal"),
    (4, 128, 0, "fp32", "pope"),
])
def test_traced_activations_match_the_cpu_allocator(micro_batch, seq_len, checkpointing, dtype, scheme):
    cfg = GPTConfig(**{**TINY, "max_seq_len": seq_len}, position={"scheme": scheme})
    traced = ActivationTracer(cfg, DTYPES[dtype], checkpointing).trace(micro_batch, seq_len)
    measured = allocator_peak(cfg, dtype, micro_batch, checkpointing)
    assert measured > 0 and traced.held <= traced.peak
    error = traced.peak / measured - 1
    print(f"B={micro_batch} T={seq_len} ckpt={checkpointing} {dtype} {scheme}: traced {traced.peak:,} B, "
          f"allocator {measured:,} B, error {error:+.2%}")
    assert abs(error) < 0.15


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("offload_optimizer, offload_params", [(False, False), (True, False), (True, True)])
def test_model_states_match_deepspeeds_estimators(gpus, offload_optimizer, offload_params):
    """bf16 model states per rank equal DeepSpeed's ZeRO-2 / ZeRO-3 estimates, but for what the
    module documents: ZeRO-1's whole 16-bit gradients and ZeRO-3's 16-bit parameter partition."""
    psi, layer = 350_000_000, 16_000_000
    if not offload_params:
        _, zero2 = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=gpus, cpu_offload=offload_optimizer)
        for stage, extra in ((2, 0), (1, 2 * psi)):
            states = model_states(psi, layer, gpus, stage, "bf16", offload_optimizer, False)
            assert abs(states.total - zero2 - extra) <= 2
            assert abs(states.deepspeed[1] - zero2) <= 2
    _, zero3, _ = estimate_zero3_model_states_mem_needs(psi, layer, num_gpus_per_node=gpus,
                                                        cpu_offload=offload_optimizer,
                                                        cpu_offload_params=offload_params, zero_init=False)
    states = model_states(psi, layer, gpus, 3, "bf16", offload_optimizer, offload_params)
    assert abs(states.total - zero3 - (0 if offload_optimizer else 2 * psi // gpus)) <= 2
    assert (states.cpu is not None) == offload_optimizer


def test_fp32_and_zero0_use_own_arithmetic():
    psi = 1_000_000
    assert model_states(psi, 0, 4, 0, "fp32", False, False).total == 16 * psi  # weights, grads, Adam m and v
    assert model_states(psi, 0, 4, 0, "bf16", False, False).total == 20 * psi  # + fp32 master and gradient copy
    assert model_states(psi, 0, 4, 2, "fp32", False, False).total == 4 * psi + 16 * psi // 4
    assert model_states(psi, 0, 4, 2, "fp32", False, False).deepspeed is None


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("estimate") / "tiny.yaml"
    path.write_text("model: {vocab_size: 512, n_layer: 2, n_head: 4, d_model: 256, max_seq_len: 1024}\n"
                    "train: {micro_batch: 4, grad_accum: 6}\n")
    return path


def test_estimate_moves_with_zero_stage_checkpointing_and_micro_batch(tiny_yaml):
    def run(*overrides, gpus=8):
        return estimate(load_config(tiny_yaml, ["deepspeed.precision=bf16", *overrides]), "a100-40gb", gpus)

    by_stage = [run(f"deepspeed.zero_stage={s}") for s in range(4)]
    totals = [e.states.total for e in by_stage]
    assert totals[0] > totals[1] > totals[2] > totals[3]
    model = GPT(GPTConfig(vocab_size=512, n_layer=2, n_head=4, d_model=256))
    layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())  # as DeepSpeed counts
    one = run("deepspeed.zero_stage=3", gpus=1)
    # ZeRO-3 weights per rank: the 16-bit partition (1/N of the whole) plus the gathered largest layer.
    assert by_stage[3].states.weights - 4 * layer == pytest.approx((one.states.weights - 4 * layer) / 8, abs=2)
    assert by_stage[0].activations == by_stage[3].activations  # the stage does not touch activations

    off, on = run(), run("train.activation_checkpointing=1")
    # The chunked loss holds its gradient buffers for the hidden states (bf16) and the lm_head
    # (fp32) and one fp32 chunk of logits (here all 4 x 1024 rows: the chunk is 2^26 / 512 rows).
    assert off.loss >= 4 * 1024 * 256 * 2 + 512 * 256 * 4 + 4 * 1024 * 512 * 4
    assert on.activations.peak < 0.75 * off.activations.peak
    assert on.max_micro_batch > off.max_micro_batch
    double = run("train.micro_batch=8")
    assert 1.5 < double.activations.peak / off.activations.peak < 2.1
    # The largest micro-batch is the largest that fits: it does, one more does not.
    assert off.states.total + off.bucket + off.max_activations.peak <= usable_bytes(off.memory_mib)
    over = run(f"train.micro_batch={off.max_micro_batch + 1}")
    assert over.total > usable_bytes(over.memory_mib) and over.max_micro_batch == off.max_micro_batch


def test_cli_prints_the_estimate(tiny_yaml, capsys):
    assert cli.main(["estimate", "--config", str(tiny_yaml), "--set", "deepspeed.zero_stage=2",
                     "deepspeed.precision=bf16", "--device", "h100-80gb", "--gpus", "8", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-2" in out and "8 x h100-80gb" in out and "fits:" in out and "estimate_zero2" in out
    assert "tokens/s per rank" in out and "989 TFLOP/s bf16" in out


def test_cli_suggests_a_micro_batch_that_keeps_the_global_batch(tiny_yaml, capsys):
    overrides = ["model.max_seq_len=2048", "train.micro_batch=4096", "train.grad_accum=3"]
    assert cli.main(["estimate", "--config", str(tiny_yaml), "--set", *overrides, "--device", "l40s-48gb"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out
    micro, accum = (int(w.split("=")[1]) for w in out.split("same global batch: --set ")[1].split()[:2])
    assert micro * accum == 4096 * 3
    fixed = estimate(load_config(tiny_yaml, [*overrides, f"train.micro_batch={micro}", f"train.grad_accum={accum}"]),
                     "l40s-48gb", 1)
    assert fixed.total <= usable_bytes(fixed.memory_mib)


def test_cli_says_when_nothing_fits(tiny_yaml, capsys):
    # A 50M x 256 embedding: 12.8B parameters, 16 bytes each in fp32 under ZeRO-0, far beyond 48 GB.
    overrides = ["model.vocab_size=50000000", "model.max_seq_len=16", "train.micro_batch=1"]
    assert cli.main(["estimate", "--config", str(tiny_yaml), "--set", *overrides, "--device", "l40s-48gb"]) == 0
    assert "DOES NOT FIT at any micro-batch" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--device", "h100-81gb"], "--device 'h100-81gb': unknown device; one of h100-80gb,"),
    (["--config", "gpu/no-such-preset"], "config file not found: gpu/no-such-preset"),
    (["--gpus", "0"], "--gpus must be at least 1, got 0"),
    (["--mfu", "1.5"], "--mfu must be in (0, 1], got 1.5"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_yaml, capsys, args, message):
    base = [] if "--config" in args else ["--config", str(tiny_yaml)]
    assert cli.main(["estimate", *base, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bifocal: error: ") and message in lines[0], captured.err
