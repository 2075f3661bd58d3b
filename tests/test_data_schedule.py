"""The sample schedule in positions: epochs and remainders for any global batch, and a change of
global batch mid-run that continues at the same sample."""

from __future__ import annotations

import pytest

from morphmlp.data import schedule


def test_each_epoch_uses_whole_global_batches_and_skips_its_remainder():
    # 10 videos, global batch 4: each epoch uses slots 0-7, skips 8-9
    assert schedule.ranges(0, 3, 10, 4) == [(0, 8), (10, 18), (20, 28)]
    assert schedule.steps_left(0, 3, 10, 4) == 6
    assert schedule.epoch_stop(0, 10, 4) == 8
    assert schedule.epoch_stop(10, 10, 5) == 20  # 5 divides 10: nothing skipped


@pytest.mark.parametrize(("before", "after"), [(4, 8), (8, 4), (4, 3), (3, 4)])
def test_a_new_global_batch_continues_at_the_same_sample_and_keeps_every_epoch(before, after):
    n, epochs = 48, 3
    # one epoch and two steps at the first global batch, then the rest at the second
    position = schedule.ranges(0, epochs, n, before)[1][0] + 2 * before
    spans = schedule.ranges(position, epochs, n, after)
    assert spans[0][0] == position  # not one sample skipped or repeated
    assert [schedule.epoch_of(low, n) for low, _ in spans] == [1, 2]  # every epoch left runs
    for low, high in spans:
        assert (high - low) % after == 0  # whole steps
        end = (schedule.epoch_of(low, n) + 1) * n
        assert 0 <= end - high < after  # and as many as fit
    assert schedule.steps_left(position, epochs, n, after) == sum(
        (high - low) // after for low, high in spans
    )


def test_a_finished_schedule_has_nothing_left():
    assert schedule.ranges(30, 3, 10, 4) == []
    assert schedule.steps_left(30, 3, 10, 4) == 0
