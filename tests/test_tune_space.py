"""Search spaces: the default space, draws that fit each stage, a GMACs budget, and invalid spaces
refused with the values named. Pareto ranking and the report files. No cluster needed."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest

from morphmlp.config import to_dict
from morphmlp.models import count_gmacs, count_params, valid_chunk_lengths, variant_config
from morphmlp.train.config import resolve_config
from morphmlp.tune.report import TrialResult, best, pareto_fronts, ranked, write_report
from morphmlp.tune.space import DEFAULT_SPACE, SearchSpaceError, load_space, parse_space

BASE = variant_config("xs", num_classes=6)  # planes 28², 14², 7², 4² at 8×112²
BASE_TREE = to_dict(resolve_config({"model": {"variant": "xs"}}))


def checked(data: dict):
    space = parse_space(data, source="space.yaml")
    space.check(BASE, BASE_TREE)
    return space


def test_default_space_draws_valid_costed_trials_reproducibly():
    space = load_space(DEFAULT_SPACE)
    space.check(BASE, BASE_TREE)
    trials = space.sample(BASE, 6, seed=3)
    assert [t.name for t in trials] == [f"trial-{i:03d}" for i in range(6)]
    listed = space.architecture["chunk_lengths"]
    for trial in trials:
        arch = trial.arch
        assert (arch.num_frames, arch.img_size, arch.num_classes) == (8, 112, 6)
        for (_, h, w), width, length, entry in zip(
            arch.grids, arch.widths, arch.chunk_lengths, listed, strict=True
        ):
            assert length in valid_chunk_lengths(h * w, width)
            assert length in (entry.values if hasattr(entry, "values") else (entry,))
        assert trial.gmacs == pytest.approx(count_gmacs(arch))
        assert trial.params == count_params(arch)
        assert 2e-4 <= trial.training["optim.lr"] <= 1e-3
        assert set(trial.values) == {*space.architecture, "optim.lr"}
    assert [t.values for t in space.sample(BASE, 6, seed=3)] == [t.values for t in trials]
    assert [t.values for t in space.sample(BASE, 6, seed=4)] != [t.values for t in trials]


def test_chunk_lengths_are_drawn_among_those_that_fit_the_drawn_width():
    # At width 21 stage 1 (28×28 plane) takes chunks of 1 or 7 only; at 28 also 14 and 28.
    space = checked(
        {
            "variant": "xs",
            "architecture": {
                "widths": {"choice": [[21, 42, 84, 168], [28, 56, 112, 224]]},
                "chunk_lengths": [{"choice": [7, 14, 28]}, 14, 7, 8],
            },
        }
    )
    seen = {(t.arch.widths[0], t.arch.chunk_lengths[0]) for t in space.sample(BASE, 40, seed=0)}
    assert seen == {(21, 7), (28, 7), (28, 14), (28, 28)}


def test_grid_values_are_each_tried_num_samples_times():
    space = checked(
        {
            "variant": "xs",
            "architecture": {"depths": [1, 1, {"grid": [1, 2]}, 1]},
            "training": {"optim.lr": {"grid": [1e-3, 1e-7]}, "optim.weight_decay": 0.01},
        }
    )
    trials = space.sample(BASE, 2, seed=0)
    combos = [(t.arch.depths[2], t.training["optim.lr"]) for t in trials]
    assert sorted(combos) == sorted(2 * list(itertools.product([1, 2], [1e-3, 1e-7])))
    assert all(t.training["optim.weight_decay"] == 0.01 for t in trials)


def test_a_gmacs_budget_rejects_configurations_before_training():
    space = load_space(DEFAULT_SPACE)
    costs = sorted(t.gmacs for t in space.sample(BASE, 12, seed=0))
    budget = costs[len(costs) // 2]
    trials = space.sample(BASE, 5, seed=0, max_gmacs=budget)
    assert len(trials) == 5 and all(t.gmacs <= budget for t in trials)
    small = checked({"variant": "xs", "architecture": {"mlp_ratio": {"choice": [2.0, 3.0]}}})
    cheapest = min(t.gmacs for t in small.sample(BASE, 4, seed=0))
    with pytest.raises(
        SearchSpaceError,
        match=rf"fits the budget of 0.1 GMACs \(the cheapest "
        rf"drawn: {cheapest:.3f} GMACs\); raise --gmacs-budget",
    ):
        small.sample(BASE, 2, seed=0, max_gmacs=0.1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # a length that divides no allowed width of the stage
        (
            {"chunk_lengths": [{"choice": [5, 7]}, 28, 7, 16]},
            r"stage 1 \(28×28=784-token plane\): chunk length 5 fits none of the stage's "
            r"widths \(28\); .* Valid here: width 28: 1, 2, 4, 7, 14, 28",
        ),
        # a fixed length used with every width, one of which it doesn't divide
        (
            {"widths": {"choice": [[21, 42, 84, 168], [28, 56, 112, 224]]}},
            r"stage 1 .*: chunk length 14 is used with every width .* does not fit width 21",
        ),
        # a width that none of the listed lengths fits
        (
            {
                "widths": {"choice": [[21, 42, 84, 168], [28, 56, 112, 224]]},
                "chunk_lengths": [{"choice": [14, 28]}, 28, 7, 8],
            },
            r"stage 1 .*: none of the chunk lengths 14, 28 fits width 21; .* Valid for width "
            r"21: 1, 7",
        ),
        # widths not divisible by the (7) groups of the fixed chunk length
        (
            {"widths": [28, 56, {"choice": [112, 120]}, 224]},
            r"stage 3 \(7×7=49-token plane\): chunk length 7 .* does not fit width 120",
        ),
        (
            {"depths": [1, 1, 2]},
            r"architecture.depths: \[1, 1, 2\] has 3 values for 4 stages",
        ),
        (
            {"widths": [2, 56, 112, 224], "chunk_lengths": [1, 28, 7, 16]},
            r"architecture.widths = \[2, 56, 112, 224\]: stage 1: width 2 is too small",
        ),
        ({"mlp_ratio": {"choice": [3.0, -1.0]}}, r"architecture.mlp_ratio = -1.0: .*positive"),
        ({"drop_path_rate": {"uniform": [0.0, 0.3]}, "depths": {"uniform": [1, 2]}}, "float"),
        ({"chunk_lengths": {"choice": [[14, 28, 7, 16]]}}, "give one entry per stage"),
        ({"num_frames": {"choice": [8, 16]}}, r"architecture.num_frames can't be searched"),
        ({"mlp_ratio": {"pick": [2.0]}}, r"\{'pick': \[2.0\]\} is not a search value"),
        ({"mlp_ratio": {"loguniform": [0, 4.0]}}, r"loguniform \[0, 4\]: low must be > 0"),
    ],
)
def test_invalid_architecture_spaces_are_refused_naming_the_values(data, message):
    with pytest.raises(SearchSpaceError, match=message) as info:
        checked({"variant": "xs", "architecture": data})
    assert str(info.value).startswith("space.yaml: ")


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"optim.lr": {"choice": [1e-3, -1.0]}}, r"training.optim.lr = -1.0: optim.lr=-1.0"),
        ({"optim.batch_size": {"grid": [4, "many"]}}, r"optim.batch_size: expected an integer"),
        ({"run.seed": {"choice": [0, 1]}}, r"training.run.seed can't be searched"),
        ({"optim.epochs": {"choice": [1, 2]}}, r"training.optim.epochs can't be searched"),
        ({"optim.nope": 1}, r"unknown config key 'optim.nope'"),
    ],
)
def test_invalid_training_spaces_are_refused_naming_the_key(training, message):
    with pytest.raises(SearchSpaceError, match=message):
        checked({"variant": "xs", "training": training})


def test_pareto_fronts_match_the_definition():
    points = [(0.2, 0.5), (0.1, 0.4), (0.3, 0.5), (0.1, 0.6), (0.25, 0.7), (0.1, 0.6)]
    fronts = pareto_fronts(points)

    def dominated_within(i: int, pool: list[int]) -> bool:
        (g, t) = points[i]
        return any(points[j][0] <= g and points[j][1] >= t and points[j] != (g, t) for j in pool)

    # Peel fronts by brute force: each front is what nothing left dominates.
    remaining, expected, front = list(range(len(points))), {}, 0
    while remaining:
        current = [i for i in remaining if not dominated_within(i, remaining)]
        expected |= dict.fromkeys(current, front)
        remaining = [i for i in remaining if i not in current]
        front += 1
    assert fronts == [expected[i] for i in range(len(points))]
    assert fronts[3] == fronts[5] == 0  # equal points share a front


def test_report_ranks_by_front_then_cost_and_writes_csv_markdown_png(tmp_path):
    results = [
        TrialResult("trial-000", "completed", 0.30, 2_000_000, 0.70, 3, {"optim.lr": 1e-3}),
        TrialResult("trial-001", "stopped early", 0.10, 900_000, 0.20, 1, {"optim.lr": 1e-7}),
        TrialResult("trial-002", "completed", 0.20, 1_500_000, 0.70, 3, {"optim.lr": 5e-4}),
        TrialResult("trial-003", "failed", 0.25, 1_700_000, None, 0, {}, error="boom"),
    ]
    order = [(front, r.name) for front, r in ranked(results)]
    assert order == [(0, "trial-001"), (0, "trial-002"), (1, "trial-000"), (None, "trial-003")]
    assert best(results).name == "trial-002"  # same top-1 as trial-000, fewer GMACs

    paths = write_report(results, str(tmp_path), gmacs_budget=0.35)
    with open(paths[0]) as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["trial-001", "trial-002", "trial-000", "trial-003"]
    assert rows[3]["error"] == "boom" and rows[3]["front"] == ""
    markdown = Path(paths[1]).read_text()
    assert "budget 0.35 GMACs" in markdown and "| 0 | trial-002 | 70.00% | 0.200 |" in markdown
    with open(paths[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
