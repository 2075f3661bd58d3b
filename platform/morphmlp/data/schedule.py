"""The training sample schedule in positions: what is consumed, whatever the global batch.

Position p is slot p % n of epoch p // n, n being the training split's videos (data/pipeline.py
maps a slot to a row through the epoch's seeded permutation). Each epoch is consumed in whole
global batches (drop_last): the slots left when fewer than one global batch remains are skipped,
and the next epoch starts at its first slot. Continuing from position p with global batch g, the
epoch of p is used up to `epoch_stop(p, n, g)`.

So the position is the truth of how far a run is, and it means the same for every global batch:
a run that resumes with another worker count, per-worker batch or accumulation continues at the
same sample, runs every remaining epoch (its validation and checkpoint included), and the
learning rate, a function of the position (train/loop.py), stays continuous.
"""

from __future__ import annotations


def epoch_of(position: int, epoch_size: int) -> int:
    return position // epoch_size


def epoch_stop(position: int, epoch_size: int, global_batch: int) -> int:
    """One past the last position of `position`'s epoch that whole global batches reach."""
    end = (epoch_of(position, epoch_size) + 1) * epoch_size
    return position + (end - position) // global_batch * global_batch


def ranges(
    start: int, num_epochs: int, epoch_size: int, global_batch: int
) -> list[tuple[int, int]]:
    """The [low, high) position ranges consumed from `start` to the end of the last epoch."""
    spans, position, total = [], start, num_epochs * epoch_size
    while position < total:
        stop = epoch_stop(position, epoch_size, global_batch)
        if stop > position:
            spans.append((position, stop))
        position = (epoch_of(position, epoch_size) + 1) * epoch_size
    return spans


def steps_left(start: int, num_epochs: int, epoch_size: int, global_batch: int) -> int:
    """Optimizer steps from `start` to the end of training at this global batch."""
    spans = ranges(start, num_epochs, epoch_size, global_batch)
    return sum((high - low) // global_batch for low, high in spans)
