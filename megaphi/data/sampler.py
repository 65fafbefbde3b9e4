"""Micro-batches for one data-parallel rank that resume exactly at a consumed-samples count.

Megatron-LM's MegatronPretrainingSampler order: sample ids consumed_samples, consumed_samples + 1, ...
are grouped into global batches of micro_batch_size * data_parallel_size consecutive ids, and DP
rank r takes ids [r * micro_batch_size, (r + 1) * micro_batch_size) of each group. An incomplete
final group is dropped. Restarting at consumed_samples = k * micro_batch_size * data_parallel_size
(what the trainer records) continues with exactly the batches a run without the restart would have
seen next.
"""

from typing import Dict, Iterator, List, Optional

import numpy as np
import torch


class MegatronPretrainingSampler:
    """Batch sampler yielding this rank's list of sample ids per micro-batch."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        for name, value, low in (
            ("micro_batch_size", micro_batch_size, 1),
            ("data_parallel_size", data_parallel_size, 1),
            ("consumed_samples", consumed_samples, 0),
            ("data_parallel_rank", data_parallel_rank, 0),
            ("total_samples", total_samples, 0),
        ):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if data_parallel_rank >= data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} must be < data_parallel_size {data_parallel_size}"
            )
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} exceeds the dataset's {total_samples} samples")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.global_micro_batch = self.micro_batch_size * int(data_parallel_size)
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full, partial = divmod(remaining, self.global_micro_batch)
        return full + (1 if partial > self.data_parallel_rank * self.micro_batch_size and not self.drop_last else 0)

    def __iter__(self) -> Iterator[List[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        for group in range(self.consumed_samples, self.total_samples, self.global_micro_batch):
            group_end = min(group + self.global_micro_batch, self.total_samples)
            if group_end - group < self.global_micro_batch and self.drop_last:
                return
            ids = list(range(group + start, min(group + start + self.micro_batch_size, group_end)))
            if ids:
                yield ids


def collate_samples(samples: List[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    """List of {"tokens", "labels"} numpy samples -> dict of int64 tensors [batch, seq_length]."""
    return {
        key: torch.from_numpy(np.stack([np.asarray(s[key], dtype=np.int64) for s in samples])) for key in samples[0]
    }


def build_pretraining_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
    drop_last: bool = True,
) -> Optional[torch.utils.data.DataLoader]:
    """DataLoader over `dataset` in MegatronPretrainingSampler order; None for no/empty dataset."""
    if dataset is None or len(dataset) == 0:
        return None
    sampler = MegatronPretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size, drop_last=drop_last
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
