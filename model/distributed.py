"""torchrun / DistributedDataParallel helpers (after torchvision's references/classification/utils.py)."""

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def init_distributed(device_type):
    """Join the process group when started by torchrun; return (rank, world_size, local_rank)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    dist.barrier()
    logger.info("distributed: rank %d of %d (%s)", rank, world_size, backend)
    return rank, world_size, local_rank


def is_main_process():
    """True on rank 0, or when not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier():
    """Synchronise ranks when distributed; no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values, device):
    """Sum a list of floats over ranks."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(flag, device):
    """Broadcast a boolean from rank 0 to every rank (used for early stopping)."""
    return bool(broadcast_int(int(flag), device))


def broadcast_int(value, device):
    """Broadcast an integer from rank 0 to every rank (the stop flag, a shortened epoch count)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([int(value)], device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def cleanup():
    """Leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
