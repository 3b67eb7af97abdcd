"""`bifocal estimate`: memory per rank and throughput of a run config on a named GPU, without one.

Per rank, at the step's peak (the start of the backward or inside it):

- **model states** (weights, gradients, optimizer states) from the DeepSpeed config the run would
  build (`run.config.deepspeed_config`: ZeRO stage, offload, precision), for Psi parameters, N
  ranks and the trained dtype's b bytes (2 for bf16/fp16, 4 for fp32). The optimizer is torch
  AdamW (`launcher/setup.py`): two fp32 moments, 8 bytes per parameter, whatever the groups.

  | stage | weights | gradients | optimizer states |
  |---|---|---|---|
  | 0 | b Psi | b Psi (+ 4 Psi fp32 copy at the step, 16-bit) | 8 Psi (+ 4 Psi fp32 master, 16-bit) |
  | 1 | b Psi | b Psi + (b + 4) Psi / N (b Psi / N, fp32) | 12 Psi / N |
  | 2 | b Psi | (b + 4) Psi / N (b Psi / N, fp32) | 12 Psi / N |
  | 3 | b Psi / N + 4 L | as stage 2 | 12 Psi / N |

  (L: the largest layer's parameters, gathered with its gradient in 16 bits; 8 L in fp32.)
  Offloading the optimizer moves its states and the fp32 gradients to CPU memory (stages 1-2:
  the partitioned gradients too; stage 1 keeps its full 16-bit gradients); offloading parameters
  (stage 3) leaves the gathered layer alone. DeepSpeed's own estimators
  (`stage_1_and_2.estimate_zero2_model_states_mem_needs`, `stage3.estimate_zero3_model_states_mem_needs`)
  cover stages 2 and 3 with 16-bit weights and fp32 master weights, which is what bifocal's bf16
  and fp16 runs are (ZeRO's optimizer keeps the fp32 partition; grad_accum_dtype is unset, so
  gradients stay 16-bit): stage 2 gives 2 Psi + 18 Psi / N (2 16-bit gradients + 4 fp32
  gradients + 4 fp32 master + 8 moments), equal to the table; stage 3 gives 4 L + 18 Psi / N,
  which leaves out the 16-bit parameter partition (2 Psi / N) the table adds. Each is printed
  beside the breakdown (tests/test_estimate.py pins both). Where they do not exist (stages 0 and
  1, and fp32 runs, which hold no separate 16-bit copy) the table is this module's arithmetic
  from the DeepSpeed 0.19 sources: ZeRO-0 with bf16/fp16 is DeepSpeed's FP16_Optimizer (fp32
  master and an fp32 copy of every gradient at the step), ZeRO-1 keeps every rank's 16-bit
  gradients whole until the step, and ZeRO 1-2 clone the fp32 partition even in fp32.
- **the gradient reduce bucket** DeepSpeed allocates once at stages 1-3 (contiguous_gradients):
  `reduce_bucket_size` elements of the gradient dtype (default 5e8: 954 MiB in bf16), two with
  overlap_comm at stages 1-2. DeepSpeed's estimators count no buffers.
- **activations**: a real forward and backward of the model (`model/gpt.py` with the config's
  activation checkpointing, in the trained dtype, the chunked loss of `model/loss.py` included)
  traced on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes and dtypes, no
  memory). A dispatch mode counts the bytes of every storage an op creates until it is freed; the
  figure is the most bytes alive beyond the parameters and their gradients. It matches the CPU
  allocator of a real run to within 1% at small sizes (tests/test_estimate.py asserts 15%).
  torch's MemTracker (torch.distributed._tools) gives the same figure but takes 30 s for a 1.3B
  model where this takes 2 s. The trace runs PyTorch's CPU kernels: attention is the CPU flash
  kernel (output and log-sum-exp kept, as CUDA's flash and memory-efficient kernels keep), and
  PoPE's 2x-wide queries and keys take the math path (the T x T scores kept), an upper bound if
  CUDA finds a fused kernel. `train.compile` is not modelled (eager figure).

The largest micro-batch that fits is the largest B whose total stays within the device's memory
less a headroom: CONTEXT_MIB for what lives outside PyTorch's allocator (CUDA context, cuBLAS and
NCCL workspaces) and FRAGMENTATION of the rest (the caching allocator reserves more than it
hands out). Throughput: tokens/s per rank = MFU x peak FLOP/s / FLOPs per token, with the FLOPs
of `model/flops.py` and the peaks of `launcher/throughput.py`.
"""

from __future__ import annotations

import argparse
import functools
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bifocal.core.errors import BifocalError
from bifocal.model import GPT, GPTConfig
from bifocal.model.flops import flops_per_token
from bifocal.model.loss import default_chunk_rows, linear_cross_entropy
from bifocal.run.config import RunConfig, config_path, deepspeed_config, load_config

from .throughput import PEAK_FLOPS

MiB, GiB = 2**20, 2**30
# name -> (the row of throughput.PEAK_FLOPS, memory in MiB as nvidia-smi reports it).
DEVICES: dict[str, tuple[str, int]] = {
    "h100-80gb": ("H100", 81559),             # SXM
    "h100-pcie-80gb": ("H100 PCIe", 81559),
    "h100-94gb": ("H100 NVL", 95830),
    "h200-141gb": ("H200", 143771),
    "a100-40gb": ("A100", 40960),
    "a100-80gb": ("A100", 81920),
    "l40s-48gb": ("L40S", 46068),
}
CONTEXT_MIB = 2048   # CUDA context (~0.5 GiB on an H100), cuBLAS and NCCL workspaces
FRAGMENTATION = 0.10  # of the rest: PyTorch's caching allocator reserves ~5-10% beyond its peak
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive among those it was shown (`track`) or saw an op create, and
    their peak. Works on fake tensors: a storage counts from the op that made it until Python
    frees it (torch keeps one Python object per storage while the storage lives)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(tree_leaves(out))
        return out

    def track(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self._seen:
                    self._seen.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


@dataclass
class Activations:
    """Bytes beyond the weights and gradients of one micro-batch's forward and backward."""

    held: int  # what the forward leaves for the backward (the loss's gradient buffers included)
    peak: int  # the most at any moment of the forward and backward


class ActivationTracer:
    """`model_cfg` built once on fake tensors with its parameters in `dtype` (as DeepSpeed casts
    them) and activation checkpointing every `checkpointing` blocks; `trace(B, T)` runs a
    training forward (chunked loss, no logits) and backward on a (B, T) batch."""

    def __init__(self, model_cfg: GPTConfig, dtype: torch.dtype, checkpointing: int) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode()
        with self.mode:
            model = GPT(model_cfg).train()
            # Module.to() cannot swap fake parameters; cast each one once (tied ones stay tied).
            cast: dict[int, torch.nn.Parameter] = {}
            for module in model.modules():
                for name, p in module._parameters.items():
                    if p is not None:
                        cast.setdefault(id(p), torch.nn.Parameter(p.detach().to(dtype), p.requires_grad))
                        module._parameters[name] = cast[id(p)]
            for p in model.parameters():
                p.grad = torch.zeros_like(p)  # resident (model states), accumulated in place
        model.set_activation_checkpointing(checkpointing)
        self.model = model
        self.params = list(model.parameters())
        self.largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

    def _counter(self, *extra: torch.Tensor) -> tuple[LiveBytes, int]:
        counter = LiveBytes()
        counter.track(self.params + [p.grad for p in self.params] + list(extra))
        return counter, counter.live

    def trace(self, micro_batch: int, seq_len: int) -> Activations:
        """Activations of a training forward and backward on a (micro_batch, seq_len) batch."""
        with self.mode:
            ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            counter, base = self._counter(ids)
            with counter:
                _, loss = self.model(ids, ids, return_logits=False)
                held = counter.live - base
                loss.backward()
        return Activations(held=held, peak=counter.peak - base)

    def trace_loss(self, micro_batch: int, seq_len: int) -> int:
        """Bytes the chunked loss alone needs (forward + backward) beyond its inputs: its gradient
        buffers for the hidden states and the lm_head weight, and one fp32 chunk of logits."""
        with self.mode:
            ids = torch.zeros(micro_batch * seq_len, dtype=torch.long)
            hidden = torch.zeros(micro_batch * seq_len, self.model.cfg.d_model, dtype=self.params[0].dtype,
                                 requires_grad=True)
            counter, base = self._counter(ids, hidden)
            with counter:
                linear_cross_entropy(hidden, self.model.lm_head.weight, ids).backward()
        return counter.peak - base


@dataclass
class ModelStates:
    """Per-rank bytes of weights, gradients and optimizer states, and DeepSpeed's figure for them."""

    weights: int
    gradients: int
    optimizer: int
    cpu: int | None  # CPU memory per node for offloaded states (DeepSpeed's estimate), else None
    deepspeed: tuple[str, int, str] | None  # (estimator, its bytes, how the breakdown differs) or None

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def model_states(params: int, largest_layer: int, gpus: int, stage: int, precision: str,
                 offload_optimizer: bool, offload_params: bool) -> ModelStates:
    """The module doc's table for `params` (Psi) parameters, `largest_layer` (L) and `gpus` (N) ranks."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    b, n, psi, layer = (4 if precision == "fp32" else 2), gpus, params, largest_layer
    master = 0 if precision == "fp32" else 4  # the fp32 copy of a 16-bit run's weights and gradients
    if stage == 0:
        return ModelStates(b * psi, (b + master) * psi, (8 + master) * psi, None, None)
    weights = b * psi if stage < 3 else (0 if offload_params else b * psi // n) + 2 * b * layer
    grads = 0 if offload_optimizer else (b + master) * psi // n
    if stage == 1:
        grads += b * psi  # every rank's whole 16-bit gradients, accumulated over the micro-batches
    optimizer = 0 if offload_optimizer else 12 * psi // n
    states = ModelStates(weights, grads, optimizer, None, None)
    if precision == "fp32":
        return states  # DeepSpeed's estimators assume 16-bit weights with fp32 master weights
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(psi, layer, num_gpus_per_node=n,
                                                            cpu_offload=offload_optimizer,
                                                            cpu_offload_params=offload_params, zero_init=False)
        note = "" if offload_optimizer else f" + {2 * psi // n / GiB:.2f} GiB 16-bit parameter partition it leaves out"
        states.deepspeed = ("estimate_zero3_model_states_mem_needs", gpu, note)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=n, cpu_offload=offload_optimizer)
        note = f" + {b * psi / GiB:.2f} GiB whole 16-bit gradients ZeRO-1 keeps" if stage == 1 else ""
        states.deepspeed = ("estimate_zero2_model_states_mem_needs", gpu, note)
    states.cpu = cpu if offload_optimizer else None
    return states


def reduce_bucket(ds_config: dict, precision: str) -> int:
    """Bytes of DeepSpeed's contiguous gradient reduce bucket(s) at ZeRO 1-3 (module doc)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    if zero.stage == 0 or not zero.contiguous_gradients:
        return 0
    buffers = 2 if zero.overlap_comm and zero.stage < 3 else 1
    return buffers * int(zero.reduce_bucket_size) * DTYPES[precision].itemsize


def vocab_size(cfg: RunConfig) -> tuple[int, str]:
    """The output vocabulary training would build, and where it comes from."""
    if not cfg.vocab_from_data:
        return cfg.model.vocab_size, "model.vocab_size"
    meta = Path(cfg.data.prepared_dir) / "meta.json"
    if meta.is_file():
        from bifocal.data_pipeline.loader import PreparedData

        return PreparedData(meta.parent).vocab_size, f"the prepared data in {meta.parent}"
    tok = cfg.data.tokenizer
    if tok.path:
        from bifocal.data_pipeline.tokenizer import load_tokenizer

        return load_tokenizer(tok.path).vocab_size, f"data.tokenizer.path {tok.path}"
    return tok.vocab_size, "data.tokenizer.vocab_size"


@dataclass
class Estimate:
    cfg: RunConfig
    device: str
    gpus: int
    vocab: int
    vocab_source: str
    precision: str
    stage: int
    offload: tuple[bool, bool]  # (optimizer, parameters)
    params: int
    states: ModelStates
    bucket: int
    activations: Activations
    loss: int  # the chunked loss alone (part of the activations' peak)
    memory_mib: int
    max_micro_batch: int  # 0: nothing fits
    max_activations: Activations | None
    flops_per_token: float
    peak_flops: float
    mfu: float

    @property
    def total(self) -> int:
        return self.states.total + self.bucket + self.activations.peak

    @property
    def usable(self) -> int:
        return usable_bytes(self.memory_mib)

    @property
    def tokens_per_s(self) -> float:
        """Per rank, at the given MFU."""
        return self.mfu * self.peak_flops / self.flops_per_token


def usable_bytes(memory_mib: int) -> int:
    return int((memory_mib - CONTEXT_MIB) * MiB * (1 - FRAGMENTATION))


def largest_micro_batch(budget: int, trace, start: int, cap: int = 2**20) -> tuple[int, Activations | None]:
    """The largest B <= cap with trace(B).peak <= budget and its activations ((0, None) when B = 1
    does not fit). Activations are nearly affine in B once B sequences fill the loss's fp32 chunk
    (`start` should: then the loss adds a constant), so the secant through two traces there
    predicts B and a few more traces bracket it."""
    seen: dict[int, Activations] = {}
    lo, hi = 0, cap + 1  # the largest B known to fit (0: none) and the smallest known not to

    def probe(b: int) -> None:
        nonlocal lo, hi
        if lo < b < hi:
            seen[b] = trace(b)
            lo, hi = (b, hi) if seen[b].peak <= budget else (lo, b)

    probe(start)
    probe(2 * start)
    while hi - lo > 1:
        width = hi - lo
        # The secant through the bracket's ends (through the two largest traces while nothing
        # failed), then the guess's neighbour, which brackets an affine curve; halve too when
        # that did not halve the bracket.
        ends = [b for b in (lo, hi) if b in seen] if hi in seen else sorted(seen)[-2:]
        if len(ends) == 2:
            (b0, a0), (b1, a1) = ((b, seen[b].peak) for b in ends)
            guess = b0 + int((budget - a0) * (b1 - b0) // max(1, a1 - a0))
            guess = min(max(guess, lo + 1), hi - 1)
            probe(guess)
            probe(guess + 1 if lo == guess else guess - 1)
        if hi - lo > width // 2:
            probe((lo + hi) // 2)
    return lo, seen.get(lo)


def estimate(cfg: RunConfig, device: str, gpus: int, mfu: float = 0.4) -> Estimate:
    """Memory per rank and throughput of `cfg` on `gpus` x `device` (module doc). Raises
    BifocalError for an unknown device, gpus < 1 or an MFU outside (0, 1]."""
    if device not in DEVICES:
        raise BifocalError(f"--device {device!r}: unknown device; one of {', '.join(DEVICES)}")
    if gpus < 1:
        raise BifocalError(f"--gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise BifocalError(f"--mfu must be in (0, 1], got {mfu}")
    vocab, vocab_source = vocab_size(cfg)
    model_cfg = replace(cfg.model, vocab_size=vocab)
    ds = deepspeed_config(cfg, gpus)  # what DeepSpeed would be given (a config_file's settings included)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    offload = (str(zero.get("offload_optimizer", {}).get("device", "none")) != "none" and stage >= 1,
               str(zero.get("offload_param", {}).get("device", "none")) != "none" and stage == 3)

    tracer = ActivationTracer(model_cfg, DTYPES[precision], cfg.train.activation_checkpointing)
    params = sum(p.numel() for p in tracer.params)
    states = model_states(params, tracer.largest_layer, gpus, stage, precision, *offload)
    bucket = reduce_bucket(ds, precision)
    seq = model_cfg.max_seq_len
    trace = functools.cache(lambda b: tracer.trace(b, seq))
    key, memory_mib = DEVICES[device]
    budget = usable_bytes(memory_mib) - states.total - bucket
    start = max(cfg.train.micro_batch, -(-default_chunk_rows(vocab) // seq))  # B x T fills a loss chunk
    max_b, max_acts = largest_micro_batch(budget, trace, start)
    return Estimate(cfg=cfg, device=device, gpus=gpus, vocab=vocab, vocab_source=vocab_source,
                    precision=precision, stage=stage, offload=offload, params=params, states=states,
                    bucket=bucket, activations=trace(cfg.train.micro_batch),
                    loss=tracer.trace_loss(cfg.train.micro_batch, seq), memory_mib=memory_mib,
                    max_micro_batch=max_b, max_activations=max_acts, flops_per_token=flops_per_token(model_cfg, seq),
                    peak_flops=dict(PEAK_FLOPS)[key][precision], mfu=mfu)


def keep_global_batch(micro_batch: int, grad_accum: int, max_micro_batch: int) -> tuple[int, int] | None:
    """The largest micro-batch <= max_micro_batch that divides micro_batch x grad_accum, with its accumulation."""
    sequences = micro_batch * grad_accum
    for m in range(min(max_micro_batch, sequences), 0, -1):
        if sequences % m == 0:
            return m, sequences // m
    return None


def report(est: Estimate, config_name: str) -> str:
    """The estimate as printed by `bifocal estimate`."""
    m, t, s, a, n = est.cfg.model, est.cfg.train, est.states, est.activations, est.gpus

    def gb(x: int) -> str:
        return f"{x / GiB:9.2f}"

    offload = " + ".join(w for w, on in zip(("optimizer", "parameters"), est.offload) if on) or "none"
    ckpt = {0: "off", 1: "every block"}.get(t.activation_checkpointing, f"every {t.activation_checkpointing} blocks")
    tokens = t.micro_batch * t.grad_accum * n * m.max_seq_len
    lines = [
        f"bifocal estimate: {config_name} on {n} x {est.device} ({est.memory_mib:,} MiB each)",
        f"model: {est.params / 1e6:.1f}M parameters ({m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, "
        f"{m.position.scheme}, vocab {est.vocab:,} from {est.vocab_source}), {est.precision}, "
        f"ZeRO-{est.stage}, offload {offload}",
        f"batch: micro-batch {t.micro_batch} x {m.max_seq_len} tokens, grad_accum {t.grad_accum}, global "
        f"{t.micro_batch * t.grad_accum * n:,} sequences ({tokens / 1e6:.2f}M tokens) per step; "
        f"activation checkpointing {ckpt}" + ("; train.compile: eager figure" if t.compile else ""),
        "",
        "memory per rank                                        GiB",
        f"  weights                                        {gb(s.weights)}",
        f"  gradients                                      {gb(s.gradients)}",
        f"  optimizer states (AdamW, fp32)                 {gb(s.optimizer)}",
        f"  DeepSpeed gradient reduce bucket               {gb(est.bucket)}",
        f"  activations, peak of forward + backward        {gb(a.peak)}",
        f"    held for the backward after the forward      {gb(a.held)}",
        f"    chunked loss alone (in the peak)             {gb(est.loss)}",
        f"  total                                          {gb(est.total)}",
        f"  usable: ({est.memory_mib:,} - {CONTEXT_MIB:,} MiB) x {1 - FRAGMENTATION:.2f}          {gb(est.usable)}",
    ]
    if s.deepspeed:
        name, value, note = s.deepspeed
        lines.append(f"  (DeepSpeed's {name}: {value / GiB:.2f} GiB for the model states{note})")
    if s.cpu is not None:
        lines.append(f"  CPU memory per node for the offloaded states (DeepSpeed's estimate): {s.cpu / GiB:.1f} GiB")
    fits = est.total <= est.usable
    lines.append("")
    if est.max_micro_batch == 0:
        lines.append(f"DOES NOT FIT at any micro-batch: one sequence needs more than a {est.device} has; "
                     f"try activation checkpointing, a higher ZeRO stage, offload or more GPUs")
    else:
        peak = est.states.total + est.bucket + est.max_activations.peak
        lines.append(f"{'fits' if fits else 'DOES NOT FIT'}: {est.total / est.usable:.0%} of usable memory; largest "
                     f"micro-batch that fits: {est.max_micro_batch} ({peak / GiB:.1f} GiB)")
        if not fits:
            keep = keep_global_batch(t.micro_batch, t.grad_accum, est.max_micro_batch)
            if keep:
                lines.append(f"  same global batch: --set train.micro_batch={keep[0]} train.grad_accum={keep[1]}")
    tps = est.tokens_per_s
    lines += [
        "",
        f"FLOPs per token: {est.flops_per_token / 1e9:.2f} GFLOP (model/flops.py, seq {m.max_seq_len}); at MFU "
        f"{est.mfu:.2f} of {est.peak_flops / 1e12:.0f} TFLOP/s {est.precision}: {tps:,.0f} tokens/s per rank, "
        f"{tps * n:,.0f} on {n}; one step of {tokens / 1e6:.2f}M tokens: {tokens / (tps * n):.2f} s",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """`bifocal estimate --config C [--set ...] --device D --gpus N [--mfu F]`."""
    if args.device not in DEVICES:  # before loading anything
        raise BifocalError(f"--device {args.device!r}: unknown device; one of {', '.join(DEVICES)}")
    cfg = load_config(args.config, args.overrides)
    est = estimate(cfg, args.device, args.gpus, args.mfu)
    print(report(est, args.config or str(config_path(None))))
    return 0
