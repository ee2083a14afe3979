"""The search space of `asnn-dist tune`: every key and value checked before anything starts,
forbidden grid points listed and left out, forbidden random draws redrawn (counted), seeded
sampling, and the trial configs built through the same schema as `train`."""

from __future__ import annotations

from pathlib import Path

import pytest

from asnn_dist.config import load_config
from asnn_dist.errors import ConfigError
from asnn_dist.config.space import flatten_space, sample_points, trial_config

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo" / "digits-lenet-hybrid.yaml")
TUNE_CONFIGS = sorted((REPO / "configs" / "tune").glob("*.yaml"))


def cfg_with(*space: str, **extra: str):
    overrides = [f"tune.space.{s}" for s in space] + [f"tune.{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config(DEMO, overrides or ["tune.num_samples=1"])


def test_grid_drops_forbidden_points_and_lists_them():
    cfg = cfg_with("encoding.num_steps={grid: [2, 4]}", "encoding.direct_steps={grid: [0, 1, 2, 4]}",
                   search__name="grid")
    s = sample_points(cfg)
    assert len(s.points) == 7  # 2 x 4 minus (T=2, k=4)
    assert {"encoding.num_steps": 2, "encoding.direct_steps": 4} not in s.points
    (note,) = s.notes()
    assert note.startswith("1 grid point(s) the config forbids are left out") and "direct_steps=4 exceeds" in note
    for p in s.points:  # every point builds the trial config `train` would run
        tc = trial_config(cfg, p, "r")
        assert (tc.encoding.num_steps, tc.encoding.direct_steps) == (p["encoding.num_steps"], p["encoding.direct_steps"])
        assert tc.tune is None and tc.run.name == "r"


@pytest.mark.parametrize("entry,expected", [
    ("encoding.schme={grid: [1]}", "encoding.schme: unknown key; did you mean 'encoding.scheme'?"),
    ("engine.zero_stage={choice: [1, 5]}", "engine.zero_stage: bad value 5"),
    ("optim.lr={loguniform: [0.0, 0.1]}", "low must be > 0"),
    ("optim.lr={uniform: [0.1, 0.01]}", "low must be below high"),
    ("optim.lr={grid: 0.1}", "non-empty list"),
    ("optim.lr={grid: [0.1], choice: [0.2]}", "exactly one of"),
    ("optim.epochs={randint: [0, 3]}", "optim.epochs: bad value 0"),
    ("run.name={grid: [a, b]}", "not searchable"),
])
def test_bad_keys_and_values_fail_up_front_in_one_line(entry, expected):
    with pytest.raises(ConfigError) as err:
        cfg_with(entry)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_grid_search_refuses_random_domains():
    with pytest.raises(ConfigError, match="grid search takes grid and fixed values only"):
        cfg_with("optim.lr={loguniform: [0.001, 0.01]}", search__name="grid")


def test_random_draws_are_seeded_and_forbidden_ones_redrawn():
    space = ("encoding.num_steps={choice: [1, 2, 4]}", "encoding.direct_steps={randint: [0, 5]}",
             "optim.lr={loguniform: [0.001, 0.01]}")
    cfg = cfg_with(*space, num_samples="12", search__seed="3")
    a, b = sample_points(cfg), sample_points(cfg)
    assert a.points == b.points and len(a.points) == 12
    assert a.resampled > 0 and a.skipped == 0 and "redrawn" in a.notes()[0]
    assert all(p["encoding.direct_steps"] <= p["encoding.num_steps"] for p in a.points)
    assert all(0.001 <= p["optim.lr"] <= 0.01 for p in a.points)
    other = sample_points(cfg_with(*space, num_samples="12", search__seed="4"))
    assert other.points != a.points


def test_draws_that_never_fit_are_skipped_and_counted():
    cfg = cfg_with("encoding.num_steps={grid: [2]}", "encoding.direct_steps={choice: [1, 3]}",
                   num_samples="30", search__max_resample="0")
    s = sample_points(cfg)
    assert s.skipped > 0 and len(s.points) == 30 - s.skipped
    assert f"{s.skipped} skipped" in s.notes()[0]


def test_nested_overrides_and_section_values_mean_the_same_keys():
    nested = flatten_space({"encoding": {"num_steps": {"grid": [2, 4]}}, "optim.lr": 0.01,
                            "model": {"options": {"width": 8}}})
    assert nested == {"encoding.num_steps": {"grid": [2, 4]}, "optim.lr": 0.01, "model.options": {"width": 8}}
    cfg = cfg_with("encoding={grid: [{num_steps: 2, direct_steps: 2}, {num_steps: 8, direct_steps: 1}]}")
    pts = sample_points(cfg).points
    built = [trial_config(cfg, p, "x").encoding for p in pts]
    assert [(e.num_steps, e.direct_steps, e.scheme) for e in built] == [(2, 2, "threshold"), (8, 1, "threshold")]


def test_no_valid_point_is_an_error():
    with pytest.raises(ConfigError, match="no point of the space is a valid config"):
        cfg_with("encoding.num_steps={grid: [2]}", "encoding.direct_steps={grid: [3, 4]}")


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=[p.name for p in TUNE_CONFIGS])
def test_search_configs_are_valid_as_written(path):
    cfg = load_config(path)
    assert cfg.tune is not None and cfg.tune.space
    if cfg.tune.search.name != "optuna":
        assert sample_points(cfg).points


def test_demo_search_covers_temporal_hybrid_and_direct_codes():
    cfg = load_config(REPO / "configs" / "tune" / "digits-encoding-mix.yaml")
    pts = sample_points(cfg).points
    tk = {(p["encoding.num_steps"], p["encoding.direct_steps"]) for p in pts}
    for t in (2, 4):
        assert {(t, 0), (t, 1), (t, 2)} <= tk  # pure temporal, hybrid, and k = T = 2 direct
    assert (4, 4) in tk  # direct coding at T = 4
    assert {p["neuron.adaptive"] for p in pts} == {True, False}


def test_concurrency_defaults_to_what_the_cluster_fits():
    from asnn_dist.tune.search import default_concurrency, scheduler_for

    cfg = load_config(DEMO, ["run.num_workers=2", "run.cpus_per_worker=1", "tune.num_samples=1"])
    assert default_concurrency(cfg, {"CPU": 5.0}) == 2
    assert default_concurrency(cfg, {"CPU": 1.0}) == 1
    gpu = load_config(DEMO, ["run.num_workers=4", "run.use_gpu=true", "tune.num_samples=1"])
    assert default_concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 2
    asha = scheduler_for(cfg, [{"optim.epochs": 3}, {"optim.epochs": 6}])
    assert asha._time_attr == "epoch" and asha._max_t == 6
    with pytest.raises(Exception, match="max_t"):
        scheduler_for(load_config(DEMO, ["run.eval_every_steps=5", "tune.scheduler.time_attr=evaluation"]), [{}])


def test_optuna_tpe_draws_from_the_space_and_is_seeded():
    pytest.importorskip("optuna")
    from asnn_dist.tune.search import space_and_searcher
    from asnn_dist.config.space import Sampled, parse_space

    cfg = cfg_with("encoding.num_steps={grid: [2, 4]}", "optim.lr={loguniform: [0.001, 0.01]}",
                   "neuron.adaptive=false", search__name="optuna", search__seed="7", num_samples="5")

    def draws() -> list[dict]:
        space, searcher, num_samples = space_and_searcher(cfg, Sampled(points=[]), parse_space(cfg))
        assert num_samples == 5
        searcher.set_search_properties("val_top1", "max", space)
        return [searcher.suggest(f"t{i}")["point"] for i in range(3)]

    first = draws()
    assert first == draws()  # the same seed, the same trials
    for p in first:
        assert p["encoding.num_steps"] in (2, 4) and 0.001 <= p["optim.lr"] <= 0.01
        trial_config(cfg, p, "x")  # a valid training config (fixed values are added in the trial)
