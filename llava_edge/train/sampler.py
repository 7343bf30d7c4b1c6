"""The order samples are seen in: seeded, per epoch, optionally grouped by modality and length.

LLaVA-1.5's ``group_by_modality_length`` keeps image and text-only samples in separate batches and
puts samples of similar length together (less padding). LLaVA groups per ``world_size x batch``;
here a group is one *global* batch (per-device batch x processes x accumulation), so the samples of
every optimizer step are the same set whatever the number of processes: a 2-process run and a
1-process run with twice the accumulation see the same data at each step (tests/test_train_dist.py).

Keys are ``(epoch, index)``: the dataset seeds per-sample randomness with the epoch (see
:mod:`llava_edge.train.data`). The order depends only on (seed, epoch), never on a global RNG, so a
resumed run replays it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def grouped_order(lengths: Sequence[int], group_size: int, generator: torch.Generator) -> list[int]:
    """LLaVA's ``get_modality_length_grouped_indices`` with groups of ``group_size`` samples.

    Each modality (sign of the length) is shuffled and cut into groups sorted longest first; the
    full groups of both modalities are shuffled together; the two leftover groups go last.
    """
    image = [i for i, n in enumerate(lengths) if n > 0]
    text = [i for i, n in enumerate(lengths) if n <= 0]

    def groups(indices: list[int]) -> list[list[int]]:
        perm = torch.randperm(len(indices), generator=generator).tolist()
        shuffled = [indices[i] for i in perm]
        chunks = [shuffled[k:k + group_size] for k in range(0, len(shuffled), group_size)]
        return [sorted(c, key=lambda i: -abs(lengths[i])) for c in chunks]

    if not image or not text:
        return [i for g in groups(image or text) for i in g]
    image_groups, text_groups = groups(image), groups(text)
    leftovers = [image_groups.pop()] if len(image_groups[-1]) < group_size else []
    leftovers += [text_groups.pop()] if len(text_groups[-1]) < group_size else []
    full = image_groups + text_groups
    order = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for g in order + leftovers for i in g]


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` keys in a seeded order; ``set_epoch`` picks the epoch's order."""

    def __init__(self, lengths: Sequence[int], *, seed: int, group_size: int, grouped: bool):
        self.lengths = list(lengths)
        self.seed = seed
        self.group_size = group_size
        self.grouped = grouped
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.grouped:
            return grouped_order(self.lengths, self.group_size, generator)
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in self.order(epoch)])

    def __len__(self) -> int:
        return len(self.lengths)
