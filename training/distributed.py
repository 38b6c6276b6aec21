"""Training with several processes (`accelerate launch`): who writes, and who waits.

Under `accelerate launch --num_processes N` every process runs the same command: the
trainers (TRL's, and PPO's own loop through `accelerate.Accelerator`) shard the data and
synchronize gradients, and everything that writes outside the process (a registry version,
a promotion) runs on the main process alone, through `on_main_process`, while the others
wait for what it returns. One process is the plain case: nothing here starts a process
group, and `on_main_process(fn)` is `fn()`.

On a machine without CUDA, `accelerate launch --num_processes 2 --cpu` starts ONE process
unless MPI is installed (accelerate's multi-CPU launcher is mpirun); what starts N processes
over gloo is `ACCELERATE_USE_CPU=1 accelerate launch --config_file
docker/accelerate-ddp.yaml --num_processes N` (or `--multi_gpu` in place of the config:
torchrun's launcher, CPU devices), which the tests use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def num_processes() -> int:
    """Processes in this run (WORLD_SIZE, which torchrun and accelerate set); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _state() -> Any:
    import torch
    from accelerate import PartialState

    # The process group the trainers share (accelerate's state is one per process).
    return PartialState(cpu=not torch.cuda.is_available())


def process_index() -> int:
    """This process's rank (0 is the main process)."""
    return 0 if num_processes() == 1 else int(_state().process_index)


def is_main_process() -> bool:
    return num_processes() == 1 or bool(_state().is_main_process)


def wait_for_everyone() -> None:
    if num_processes() > 1:
        _state().wait_for_everyone()


class MainProcessFailed(RuntimeError):
    """What the other processes raise when the main process's part failed."""


def on_main_process(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process only; every process returns its result (picklable:
    a registry Version, a dict). An exception on the main process is raised there and, as
    MainProcessFailed with its message, on the others, so that none waits forever."""
    if num_processes() == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    payload: list[Any] = [None]
    if is_main_process():
        try:
            payload[0] = ("ok", fn())
        except BaseException as err:
            broadcast_object_list([("error", f"{type(err).__name__}: {err}")], from_process=0)
            raise
    broadcast_object_list(payload, from_process=0)
    status, value = payload[0]
    if status == "error":
        raise MainProcessFailed(f"the main process failed: {value}")
    return value


def from_main_process(value: T) -> T:
    """The main process's `value`, in every process (a broadcast): for decisions every
    process must take alike, such as stopping a run on the main process's clock."""
    if num_processes() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    shared: list[Any] = [value]
    broadcast_object_list(shared, from_process=0)
    return shared[0]


def mean_over_processes(value: float) -> float:
    """The mean of `value` over the processes (an all-reduce; every process must call it):
    for figures a trainer reports per process, such as transformers' `training_loss`, which
    holds the main process's share of the batches alone."""
    if num_processes() == 1:
        return value
    import torch
    from accelerate.utils import reduce

    tensor = torch.tensor([value], dtype=torch.float64, device=_state().device)
    return float(reduce(tensor, reduction="mean").item())


def leave_process_group() -> None:
    """Under `accelerate launch`, take the process group down before the interpreter does:
    left to exit, its communication threads abort a finished run ("terminate called
    without an active exception", exit code -6) after the version was written. Every entry
    point a launcher runs (the CLI, a launched job) calls it last."""
    import sys

    torch = sys.modules.get("torch")  # only a process that imported torch can have one
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        torch.distributed.destroy_process_group()
