"""Which device this process computes on (training, sampling, feature extraction)."""
import os

import torch


def device() -> torch.device:
    """This process's device: its rank's GPU when there are GPUs (LOCAL_RANK, as submitit and torchrun set it),
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
