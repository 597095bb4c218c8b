"""The processes of a distributed `pmner-predict` run (`torchrun`, `accelerate launch`): ranks from the
environment, one device per process, results gathered as JSON in byte tensors, and the input cut into the same
batches in one process or many; `unstarted_processes_warning` says when `accelerate launch` started fewer processes
than it was asked for.
"""

import json
import os
from dataclasses import dataclass

from .output import UsageError
from .reading import Record


def parse_device(value: str | None):
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


@dataclass
class Processes:
    """This process's place among those started by `torchrun` or `accelerate launch` (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: object = None
    started_group: bool = False

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Processes":
        values = {name: environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        try:
            world, rank = int(values["WORLD_SIZE"] or 1), int(values["RANK"] or 0)
            local_rank = int(values["LOCAL_RANK"] or rank)
        except ValueError as error:
            raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {values}") from error
        if world < 1 or not 0 <= rank < world or local_rank < 0:
            raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must satisfy 0 <= RANK < WORLD_SIZE, got {values}")
        return cls(rank=rank, world=world, local_rank=local_rank)

    def device(self, device: str | None, cuda_available: bool):
        """One GPU per process: `cuda:LOCAL_RANK` for no `--device` (or a bare `cuda`) when CUDA is available."""
        if self.world > 1 and cuda_available and device in (None, "cuda"):
            return f"cuda:{self.local_rank}"
        return parse_device(device)

    def start(self):
        if self.world == 1:
            return
        import torch.distributed as distributed

        if not distributed.is_initialized():
            distributed.init_process_group("gloo")  # MASTER_ADDR / MASTER_PORT from the launcher
            self.started_group = True
        else:
            self.group = distributed.new_group(backend="gloo")  # CPU tensors, whatever the caller's backend
        if distributed.get_world_size() != self.world:
            raise RuntimeError(f"WORLD_SIZE is {self.world} but the process group has {distributed.get_world_size()}")

    def stop(self):
        if self.started_group:
            import torch.distributed as distributed

            distributed.destroy_process_group()

    def gather(self, value) -> list:
        """`value` of every process, in rank order, on every process: JSON in byte tensors (nothing unpickled)."""
        if self.world == 1:
            return [value]
        import torch
        import torch.distributed as distributed

        payload = torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        distributed.all_gather(sizes, torch.tensor([payload.numel()]), group=self.group)
        longest = max(int(size) for size in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        distributed.all_gather(buffers, padded, group=self.group)
        return [json.loads(buffer[: int(size)].numpy().tobytes()) for buffer, size in zip(buffers, sizes)]


def batches_of(entries, batch_size: int):
    """The input cut into batches of `batch_size` records (the unreadable entries among them ride along): the same
    batches in one process or many, so that every tweet is tagged in the same company (same padding, same numbers)."""
    batch, records = [], 0
    for entry in entries:
        batch.append(entry)
        if isinstance(entry, Record):
            records += 1
            if records == batch_size:
                yield batch
                batch, records = [], 0
    if batch:
        yield batch


# set by launchers that do start one process per rank (torchrun and `accelerate launch --multi_gpu`, MPI)
RANK_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_process_count(pid: int) -> int | None:
    """The `--num_processes N` on the command line of process `pid` (an `accelerate launch`); None when it has none
    or cannot be read (not Linux, another user's process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for index, word in enumerate(words):
        name, _, value = word.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (words[index + 1] if index + 1 < len(words) else "")
            return int(value) if value.isdigit() else None
    return None


def unstarted_processes_warning(program: str, command: str) -> str | None:
    """A one-line warning when `accelerate launch` was asked for several processes but started only this one (its
    plain launcher, e.g. `--num_processes 2 --cpu`, runs one process: it sets MASTER_ADDR / MASTER_PORT for more than
    one process, but no WORLD_SIZE); it names the commands that start them. `command`: how this program is named after
    the launcher, with its CPU flag. None when nothing is wrong."""
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" not in env or "MASTER_PORT" not in env or any(name in env for name in RANK_VARIABLES):
        return None
    asked = launcher_process_count(os.getppid())
    if asked is not None and asked < 2:
        return None  # e.g. --num_machines 2 with one process each
    count = asked or "N"
    return (
        f"{program}: warning: `accelerate launch` was asked for {'several' if asked is None else asked} "
        f"processes but started only this one (without --multi_gpu it runs a single process, --cpu or not); for "
        f"{count} CPU processes run `accelerate launch --multi_gpu --num_processes {count} {command}` or "
        f"`torchrun --nproc_per_node {count} {command}`"
    )
