"""The Loader in torch's machinery: DataLoader worker processes and torch.distributed ranks."""

from __future__ import annotations

import copy

import torch


class DataLoaderEpochs:
    """`for batch in loader.dataloader(2)`: one epoch per iteration through a DataLoader whose
    workers each serve every num_workers-th batch; the Loader's state follows the batches."""

    def __init__(self, loader, num_workers: int, kwargs: dict):
        self.loader, self.num_workers, self.kwargs = loader, int(num_workers), kwargs

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        src = self.loader
        worker_copy = copy.copy(src)
        worker_copy.pin_memory = False  # pinned in the main process by the DataLoader instead
        dl = torch.utils.data.DataLoader(worker_copy, batch_size=None, num_workers=self.num_workers,
                                         pin_memory=src.pin_memory, **self.kwargs)
        for batch in dl:
            src.offset += batch["row"].shape[0]
            yield batch
        src.offset = 0
        src.epoch += 1


def rank_and_world(rank, world_size) -> tuple[int, int]:
    """Explicit values win; otherwise an initialized torch.distributed process group's; else 0 of 1."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    return (0 if rank is None else int(rank)), (1 if world_size is None else int(world_size))
