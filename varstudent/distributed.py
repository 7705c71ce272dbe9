"""Data-parallel training under torchrun: DistributedDataParallel, gloo on the CPU, nccl on GPUs.

`teacher.nproc > 1` makes the teacher stage launch N processes of this module the way `torchrun --standalone
--nproc_per_node N` does (torch's elastic launcher, in-process); every
process runs the same `stages.teacher`, and `train.fit` (through the helpers below) wraps the model in DDP and
gives each process a contiguous slice of every mini-batch. DDP averages the slices' gradients, which equals
the whole batch's gradient when the slices are equally large, so N processes follow the single-process run
up to floating-point summation order (and the last, uneven batch of an epoch) — without `teacher.dropout` /
`teacher.shift`: with them each process draws its own masks and shifts (seeded by rank), a different random
draw from the single process's. Rank 0 writes the outputs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from varstudent.errors import TrainingError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_worker() -> bool:
    return world()[1] > 1


def wrap(model: nn.Module) -> nn.Module:
    """The module to call for training steps: DDP over `model` in a process group, else `model` itself."""
    if not is_worker():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(index: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a mini-batch's sample indices."""
    rank, size = world()
    return index if size == 1 else index.tensor_split(size)[rank]


def all_sum(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-process sums -> sums over all processes (epoch statistics, so every rank decides alike)."""
    if is_worker():
        for value in values.values():
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return values


def launch_teacher(params, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Run the teacher stage on `teacher.nproc` processes (torchrun's launcher, standalone on this machine);
    return rank 0's metrics. A worker's error becomes this stage's one error line, without torchrun's report."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = params.teacher.nproc
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()), max_restarts=0)
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun does: N processes share the cores
    with tempfile.TemporaryDirectory(prefix="varstudent-ddp-") as scratch:
        settings, error_file = Path(scratch) / "params.json", Path(scratch) / "error.txt"
        settings.write_text(json.dumps(params.to_dict()))
        elastic.setLevel(logging.CRITICAL)  # a failed worker is reported below, in one line
        try:
            elastic_launch(config, sys.executable)("-m", "varstudent.distributed", str(settings), str(data_dir),
                                                   str(out_dir), str(error_file))
        except ChildFailedError as exc:
            detail = error_file.read_text().strip() if error_file.is_file() else \
                f"a worker failed ({str(exc).strip().splitlines()[0][:200]})"
            raise TrainingError(f"teacher on {nproc} processes: {detail}") from None
        finally:
            elastic.setLevel(level)
    from varstudent.artifacts import read_json

    return read_json(Path(out_dir) / "metrics.json", "teacher metrics")


def _worker(settings: Path, data_dir: Path, out_dir: Path, error_file: Path) -> None:
    """One torchrun process: join the group, train, and let rank 0 keep the outputs."""
    from varstudent import stages
    from varstudent.config import Params, _build
    from varstudent.errors import VarstudentError
    from varstudent.train import resolve_device

    params = _build(Params, json.loads(settings.read_text()), "")
    cuda = resolve_device(params.runtime.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if rank == 0:  # one copy of the training log
        logging.basicConfig(stream=sys.stderr, format="varstudent: %(message)s")
        logging.getLogger("varstudent").setLevel(logging.INFO)
    try:
        with tempfile.TemporaryDirectory(prefix=f"varstudent-rank{rank}-") as scratch:
            stages.teacher(params, data_dir, out_dir if rank == 0 else Path(scratch))
    except VarstudentError as exc:
        if rank == 0:
            error_file.write_text(str(exc))
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*(Path(arg) for arg in sys.argv[1:5]))
