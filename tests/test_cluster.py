"""Checking a job's resource request against the cluster before any worker starts."""

from __future__ import annotations

import pytest

from morphmlp.cluster import Demand, UnmeetableRequestError, check_resources

TWO_CPUS = [{"CPU": 2.0, "memory": 8e9}]


def _no_autoscaler() -> bool:
    return False


def test_a_request_that_fits_passes():
    check_resources(
        [Demand("training worker", 2, {"CPU": 0.5}), Demand("decode actor", 1, {"CPU": 1.0})],
        wait_s=0,
        nodes=lambda: TWO_CPUS,
        autoscaler=_no_autoscaler,
    )


@pytest.mark.parametrize(
    ("demands", "named"),
    [
        ([Demand("training worker", 1, {"CPU": 1.0, "GPU": 1.0})], "1 GPU"),
        ([Demand("training worker", 4, {"CPU": 1.0})], "4 training worker(s)"),
        # each fits alone; together they don't
        (
            [Demand("training worker", 2, {"CPU": 1.0}), Demand("decode actor", 1, {"CPU": 1.0})],
            "decode actor",
        ),
        ([Demand("decode actor", 1, {"CPU": 1.0, "decode": 1.0})], "1 decode"),
    ],
)
def test_a_shortfall_without_an_autoscaler_is_refused_at_once_naming_it(demands, named):
    with pytest.raises(UnmeetableRequestError, match="no autoscaler") as err:
        check_resources(demands, wait_s=3600, nodes=lambda: TWO_CPUS, autoscaler=_no_autoscaler)
    assert named in str(err.value)
    assert "2 CPU" in str(err.value)  # what the cluster has


def test_one_actor_must_fit_on_one_node():
    nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    with pytest.raises(UnmeetableRequestError, match="need 2 CPU each"):
        check_resources(
            [Demand("training worker", 1, {"CPU": 2.0})],
            wait_s=0,
            nodes=lambda: nodes,
            autoscaler=_no_autoscaler,
        )


def test_with_an_autoscaler_it_waits_for_nodes_then_gives_up():
    arrivals = [TWO_CPUS, TWO_CPUS, [*TWO_CPUS, {"CPU": 2.0, "GPU": 1.0}]]
    check_resources(
        [Demand("training worker", 1, {"CPU": 1.0, "GPU": 1.0})],
        wait_s=60,
        nodes=lambda: arrivals.pop(0),
        autoscaler=lambda: True,
        poll_s=0.01,
    )
    assert arrivals == []  # it polled until the GPU node came

    with pytest.raises(UnmeetableRequestError, match="added nothing that fits in 0 s"):
        check_resources(
            [Demand("training worker", 1, {"GPU": 1.0})],
            wait_s=0.05,
            nodes=lambda: TWO_CPUS,
            autoscaler=lambda: True,
            poll_s=0.01,
        )


@pytest.mark.slow
def test_the_local_cluster_is_read_as_it_is(ray_session):
    """On a real local Ray: its CPUs and the custom resource are seen, and no autoscaler."""
    check_resources([Demand("decode actor", 1, {"CPU": 1.0, "decode": 1.0})], wait_s=0)
    with pytest.raises(UnmeetableRequestError, match="no autoscaler"):
        check_resources([Demand("training worker", 1, {"GPU": 1.0})], wait_s=600)
