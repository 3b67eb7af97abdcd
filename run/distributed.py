"""Process-group setup for one process (no launcher) or many (deepspeed launcher, torchrun, srun)."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import torch

from bifocal.core import logs

from . import slurm

log = logs.get_logger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extensions_dir() -> Path:
    """Where DeepSpeed's just-in-time ops are cached: one folder per DeepSpeed and torch version,
    since an op built by one DeepSpeed (a CI lane, another venv) fails to load in another
    (`shm_comm_op` lacks `vector_kernel_level` when 0.19.8 loads 0.19.0's build)."""
    from importlib.metadata import version

    return Path.home() / ".cache" / "bifocal" / "torch_extensions" / f"deepspeed-{version('deepspeed')}-torch-{torch.__version__}"


STALE_BUILD_S = 600  # a JIT build of DeepSpeed's op takes about a minute on 2 cores


def clear_stale_build_locks(root: Path) -> list[Path]:
    """Remove the build locks under `root` older than STALE_BUILD_S; returns them.

    torch.utils.cpp_extension guards each just-in-time build (and each load's up-to-date check)
    with a `lock` file (torch.utils.file_baton.FileBaton) that a process killed meanwhile leaves
    behind; every later run then waits for it forever, silently (a CI lane hung this way). A lock
    older than any build is one nobody holds."""
    removed = []
    for lock in root.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > STALE_BUILD_S:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # another rank removed it, or its build finished
            pass
    return removed


def setup_environment(threads: int | None = None) -> None:
    """Take the ranks from Slurm under `srun`, else make a lone process look like rank 0 of 1
    (else DeepSpeed reaches for MPI); cache the compiled shared-memory op in a fixed place (else
    it rebuilds for ~60 s per run), and share the CPU cores between the ranks of this machine."""
    if "RANK" not in os.environ:
        lone = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        os.environ.update(slurm.rank_environment(os.environ) or lone)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    for lock in clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"])):
        log.warning(f"removed {lock}: a build lock left by a killed process (every run would wait on it)")
    if not torch.cuda.is_available():
        # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))


SHM_DIR = Path("/dev/shm")


def shm_buffer(rank: int) -> Path:
    """The shared-memory file in which DeepSpeed's CPU all-reduce keeps this machine's rank `rank`
    (~69 MB; deepspeed/ops/csrc/cpu/comm/shm.cpp: `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_
    <MASTER_PORT>_<rank>`, created when every rank is on one machine). A DeepSpeed internal:
    tests/test_distributed_corners.py fails the day the name changes."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> Path | None:
    """Unlink this rank's DeepSpeed shared-memory buffer once every rank has mapped it.

    DeepSpeed never unlinks it (deepspeedai/DeepSpeed#4115), so each CPU run on one machine left
    ~69 MB per rank in /dev/shm until reboot: a day of tests filled the 24 GiB machine and slowed
    everything to a crawl. Every rank maps every buffer inside `init_distributed`, so after a
    barrier the names are no longer needed; the memory stays mapped until the ranks exit, on any
    exit (a crash or SIGKILL included). Returns the file removed, or None where there was none."""
    torch.distributed.barrier()  # every rank has opened every other rank's buffer
    path = shm_buffer(torch.distributed.get_rank())
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def init_distributed(device: str) -> None:
    """Collective: DeepSpeed's process group from the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT), NCCL for `device` "cuda" (each rank on GPU LOCAL_RANK), gloo for "cpu" (the
    shared-memory buffer then released, see release_shm_buffer)."""
    import deepspeed

    backend = "nccl" if device == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if device == "cpu":
        released = release_shm_buffer()
        # Read by tests/test_distributed_corners.py: no line there means the name has changed.
        log.debug(f"released DeepSpeed's shared-memory buffer {released}" if released else
                  "no DeepSpeed shared-memory buffer to release (ranks on several machines?)")
    if device == "cuda":
        # Modulo: a task that Slurm gave one GPU of its own (--gpus-per-task) sees it as device 0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def shutdown() -> None:
    """Destroy the process group (local, no collective), through DeepSpeed so its cached groups go
    too. A process that reaches interpreter exit with the group alive can abort there ("terminate
    called without an active exception", exit 250 through the launcher) after a finished run."""
    global _sequence_parallel
    _sequence_parallel = None  # DeepSpeed releases its groups with the process group
    gc.collect()  # what still holds a group (an engine in a reference cycle) goes while the groups live
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """The process group for the body, torn down on every way out of it (return, error, signal)."""
    init_distributed(device)
    try:
        yield
    finally:
        shutdown()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    """Collective: wait for every rank (nothing without a process group)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# -- sequence parallelism (DeepSpeed-Ulysses) ---------------------------------------------------------
#
# DeepSpeed's own groups (deepspeed.runtime.sequence_parallel.parallel_state_sp, what its Ulysses
# training passes to `deepspeed.initialize(mpu=...)`): ranks [i*N, (i+1)*N) share sequences, and the
# engine reduces gradients and partitions ZeRO states over all ranks, averaging over the
# data-parallel ones only (world / N), so each rank's loss is its shard's share of the sequence's.


_sequence_parallel = None  # parallel_state_sp while its groups exist


def init_sequence_parallel(n: int):
    """Collective: DeepSpeed's sequence-parallel groups of `n` consecutive ranks; returns the `mpu`
    for `deepspeed.initialize`, or None for n == 1. The groups go with the process group (shutdown)."""
    global _sequence_parallel
    if n == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(n)
    _sequence_parallel = parallel_state_sp
    return parallel_state_sp


def sequence_parallel_mpu():
    """What init_sequence_parallel returned (for `deepspeed.initialize(mpu=...)`), or None."""
    return _sequence_parallel


def sequence_parallel_group():
    """This rank's sequence-parallel process group, or None without sequence parallelism."""
    mpu = sequence_parallel_mpu()
    return mpu.get_sequence_parallel_group() if mpu else None


def sequence_parallel_size() -> int:
    """N, the ranks that share each sequence (1 without sequence parallelism)."""
    mpu = sequence_parallel_mpu()
    return mpu.get_sequence_parallel_world_size() if mpu else 1


def sequence_parallel_rank() -> int:
    """Which 1/N of every sequence this rank holds."""
    mpu = sequence_parallel_mpu()
    return mpu.get_sequence_parallel_rank() if mpu else 0


def data_parallel_size() -> int:
    """Groups of ranks that read different sequences: world / sequence_parallel_size."""
    return world_size() // sequence_parallel_size()


def data_parallel_rank() -> int:
    """Which data-parallel group this rank is in: rank / sequence_parallel_size."""
    return rank() // sequence_parallel_size()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Collective: sum a few floats over ranks in one all-reduce (loss, flags), in float64; the
    values as they are without a process group."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and world_size() > 1:
        backend = torch.distributed.get_backend()
        if backend == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def resolve_device(device: str) -> str:
    """`train.device` (auto | cpu | cuda) as the device to use: auto is cuda when one is visible.
    Raises RuntimeError for cuda with no CUDA device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return device
