"""torch.distributed for one training job: one process per device, ranks from the environment.

submitit (`TorchDistributedEnvironment().export()`) and torchrun both set WORLD_SIZE, RANK, MASTER_ADDR and
MASTER_PORT; NCCL on GPUs, gloo on CPU. With one rank nothing is initialised."""
import os

import torch
import torch.distributed as dist


def setup() -> tuple[int, int]:
    """(rank, world size), initialising the default process group when there is more than one rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_sum(tensors: list[torch.Tensor], world: int) -> None:
    """In-place sum over ranks (no-op on one rank)."""
    if world > 1:
        for t in tensors:
            dist.all_reduce(t)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
