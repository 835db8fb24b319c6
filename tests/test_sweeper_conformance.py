"""embft_optuna speaks the official hydra-optuna-sweeper's dialect.

Written from that plugin's documentation (hydra.cc, "Optuna Sweeper plugin") and its example apps'
documented behaviour: every key of its config schema with its meaning, its search-space mapping,
its sampler nodes, the sphere / grid / multi-objective / custom-search-space examples (re-written in
tests/sweeper_examples with only the sweeper's name changed) and its failure rule. Where embft
differs on purpose, the test says so and asserts embft's documented behaviour.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).resolve().parent / "sweeper_examples"
if importlib.util.find_spec("hydra_plugins.embft_optuna_sweeper") is None:  # until installed editable
    sys.path.insert(0, str(ROOT / "src"))

from hydra_plugins.embft_optuna_sweeper._search_space import parse_search_space  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- the config schema


@pytest.fixture
def sweeper_of():
    """What Hydra builds for `-m` from the sphere example's config and overrides."""

    def build(*overrides: str, config: str = "config") -> Any:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(EXAMPLES / "conf"), version_base=None):
            cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
        return cfg, instantiate(cfg.hydra.sweeper).sweeper

    yield build
    GlobalHydra.instance().clear()


def test_every_key_of_the_official_schema_is_accepted_with_its_meaning(sweeper_of, tmp_path: Path) -> None:
    cfg, sweeper = sweeper_of(
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=7",
        "hydra.sweeper.direction=maximize",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/s.db",
        "hydra.sweeper.study_name=mine",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.max_failure_rate=0.25",
        "hydra.sweeper.search_space={w:{type:int,low:1,high:9,step:2}}",
        "hydra.sweeper.custom_search_space=math.isfinite",
    )
    assert sweeper.sampler.func is optuna.samplers.RandomSampler
    assert (sweeper.seed, sweeper.seed_key) == (7, "hydra.sweeper.sampler.seed")
    assert sweeper.directions == ["maximize"]
    assert sweeper.storage_url == f"sqlite:///{tmp_path}/s.db" and sweeper.study_name == "mine"
    assert (sweeper.n_trials, sweeper.n_jobs, sweeper.max_failure_rate) == (3, 2, 0.25)
    assert sweeper.search_space == {"w": {"type": "int", "low": 1, "high": 9, "step": 2}}
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == {
        "x": "range(-5.5, 5.5, step=0.5)",
        "y": "choice(-5, 0, 5)",
    }
    import math

    assert sweeper.extend_trial is math.isfinite
    # The deprecated search_space entries are searched; params win where both name a key.
    space = parse_search_space(
        {"y": "choice(1, 2)"}, search_space=sweeper.search_space | {"y": {"type": "float", "low": 0, "high": 1}}
    )
    assert space.distributions == {"w": IntDistribution(1, 9, step=2), "y": CategoricalDistribution((1, 2))}


def test_both_seed_spellings_are_accepted_and_the_samplers_own_wins(sweeper_of) -> None:
    assert sweeper_of()[1].seed == 123  # hydra.sweeper.sampler.seed in the example's config
    assert sweeper_of("hydra.sweeper.sampler.seed=null", "hydra.sweeper.seed=5")[1].seed == 5
    _, both = sweeper_of("hydra.sweeper.seed=5")
    assert (both.seed, both.seed_key) == (123, "hydra.sweeper.sampler.seed")


@pytest.mark.parametrize(
    ("node", "sampler"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("grid", optuna.samplers.GridSampler),
        ("nsgaii", optuna.samplers.NSGAIISampler),
        ("qmc", optuna.samplers.QMCSampler),
        ("gp", optuna.samplers.GPSampler),
    ],
)
def test_the_official_sampler_nodes_build_their_optuna_samplers(sweeper_of, node: str, sampler: type) -> None:
    _, sweeper = sweeper_of(f"hydra/sweeper/sampler={node}", "hydra.sweeper.sampler.seed=3")
    assert sweeper.sampler.func is sampler and sweeper.seed == 3


def test_cmaes_node_builds_cma_es_or_names_the_missing_package(sweeper_of) -> None:
    from hydra.errors import InstantiationException

    if importlib.util.find_spec("cmaes") is not None:
        assert sweeper_of("hydra/sweeper/sampler=cmaes")[1].sampler.func is optuna.samplers.CmaEsSampler
        return
    with pytest.raises(InstantiationException, match="cmaes") as raised:
        sweeper_of("hydra/sweeper/sampler=cmaes")
    assert "pip install cmaes" in str(raised.value)


def test_motpe_gives_the_removal_message_not_hydras_generic_one(sweeper_of) -> None:
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="MOTPESampler was removed in Optuna 4.*hydra/sweeper/sampler=tpe"):
        sweeper_of("hydra/sweeper/sampler=motpe")


# ----------------------------------------------------------------------------- the search space


@pytest.mark.parametrize(
    ("line", "distribution"),
    [  # the table of the official plugin's documentation and tests
        ("key=choice(1,2)", CategoricalDistribution([1, 2])),
        ("key=choice(true, false)", CategoricalDistribution([True, False])),
        ("key=choice('hello', 'world')", CategoricalDistribution(["hello", "world"])),
        ("key=shuffle(range(1,3))", CategoricalDistribution([1, 2])),
        ("key=range(1,3)", IntDistribution(1, 3)),
        ("key=interval(1, 5)", FloatDistribution(1, 5)),  # a float search, though both bounds look like ints
        ("key=int(interval(1, 5))", IntDistribution(1, 5)),
        ("key=tag(log, interval(1, 5))", FloatDistribution(1, 5, log=True)),
        ("key=tag(log, int(interval(1, 5)))", IntDistribution(1, 5, log=True)),
        ("key=range(0.5, 5.5, step=1)", FloatDistribution(0.5, 5.5, step=1)),
    ],
)
def test_the_search_space_maps_as_the_official_plugin_documents(line: str, distribution: Any) -> None:
    assert parse_search_space({}, [line]).distributions == {"key": distribution}


def test_a_dropout_interval_with_integer_bounds_searches_floats() -> None:
    dropout = parse_search_space({}, ["dropout=interval(0, 1)"]).distributions["dropout"]
    assert isinstance(dropout, FloatDistribution) and (dropout.low, dropout.high) == (0.0, 1.0)


def test_a_fixed_command_line_value_leaves_the_search_space() -> None:
    space = parse_search_space(
        {"x": "range(-5.5, 5.5, step=0.5)", "y": "choice(-5, 0, 5)"}, ["x=choice(0, 1, 2)", "y=0"]
    )
    assert space.distributions == {"x": CategoricalDistribution([0, 1, 2])} and space.fixed == {"y": "y=0"}


# ----------------------------------------------------------------------------- the example apps


def _example(script: str, tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / script),
            "--multirun",
            *(o for o in overrides if o.startswith("--")),  # argparse: options before the overrides
            f"hydra.sweep.dir={tmp_path}/sweep",
            *(o for o in overrides if not o.startswith("--")),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _results(tmp_path: Path) -> Any:
    return OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")


@pytest.mark.parametrize("with_commandline", [False, True])
def test_sphere_example_writes_best_params_and_value(tmp_path: Path, with_commandline: bool) -> None:
    storage = f"sqlite:///{tmp_path}/test.db"
    extra = ["x=choice(0, 1, 2)", "y=0"] if with_commandline else []
    _example("sphere.py", tmp_path, "hydra.sweeper.n_trials=20", f"hydra.sweeper.storage={storage}", "~z", *extra)
    results = _results(tmp_path)
    best = optuna.load_study(study_name="sphere", storage=storage).best_trial
    assert results.name == "optuna" and results.best_value == best.value
    assert results.best_params.x == best.params["x"]
    if with_commandline:
        assert "y" not in results.best_params and "y" not in best.params and best.params["x"] in (0, 1, 2)
    else:
        assert results.best_params.y == best.params["y"] and results.best_params.y in (-5, 0, 5)
        assert (results.best_params.x * 2) % 1 == 0 and -5.5 <= results.best_params.x <= 5.5


def test_grid_example_visits_choice_and_range_points(tmp_path: Path) -> None:
    proc = _example("sphere.py", tmp_path, "--config-name=grid", "hydra.sweeper.n_trials=10")
    results = _results(tmp_path)
    assert results.best_params.x in (-1, 1) and results.best_params.y in (-1.0, 0.0)
    assert results.best_params.z in ("foo", "bar") and results.best_value == 1
    assert proc.stdout.count("Launching 1 jobs locally") == 8  # n_trials capped to the grid's 2 x 2 x 2 points


@pytest.mark.parametrize("with_commandline", [False, True])
def test_multi_objective_example_writes_the_pareto_front_as_solutions(tmp_path: Path, with_commandline: bool) -> None:
    extra = ["x=range(0, 5)", "y=range(0, 3)"] if with_commandline else []
    _example("multi-objective.py", tmp_path, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123", *extra)
    solutions = _results(tmp_path).solutions
    assert solutions
    steps = {0} if with_commandline else {0, 0.5}
    for a in solutions:
        assert set(a) == {"params", "values"}
        assert a.params.x % 1 in steps and a.params.y % 1 in steps
        assert not any(_dominates(b["values"], a["values"]) for b in solutions)


def _dominates(a: Any, b: Any) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def test_custom_search_space_example_adds_its_conditional_params(tmp_path: Path) -> None:
    _example(
        "custom-search-space-objective.py", tmp_path, "hydra/sweeper/sampler=random", "max_z_difference_from_x=0.3"
    )
    best = _results(tmp_path).best_params
    assert abs(best.x - best.z) <= 0.3 and 0 <= best["+w"] <= 1


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("max_failure_rate", [0.5, 1.0])
def test_a_failing_jobs_error_reaches_stderr_once_the_failure_budget_is_spent(
    tmp_path: Path, max_failure_rate: float
) -> None:
    proc = _example(
        "sphere.py",
        tmp_path,
        "hydra.sweeper.n_trials=20",
        "hydra.sweeper.n_jobs=2",
        "hydra/sweeper/sampler=random",
        f"hydra.sweeper.max_failure_rate={max_failure_rate}",
        "error=true",
        check=False,
    )
    assert "RuntimeError: cfg.error is True" in proc.stdout  # every failed trial's error is logged
    if max_failure_rate < 1.0:
        assert proc.returncode == 1 and "RuntimeError: cfg.error is True" in proc.stderr
    else:
        assert proc.returncode == 0 and "RuntimeError: cfg.error is True" not in proc.stderr


def test_difference_the_failure_budget_counts_the_sweeps_trials_not_one_batch(tmp_path: Path) -> None:
    """Official: a batch whose failure rate exceeds max_failure_rate stops the sweep (with 0.0, the
    first failure). embft (documented difference): the rate over the sweep's finished trials, checked
    once failure_rate_min_trials (5) finished, so one diverged trial does not end a long search."""
    proc = _example(
        "sphere.py",
        tmp_path,
        "hydra.sweeper.n_trials=8",
        "error=true",
        "hydra.sweeper.max_failure_rate=0.0",
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout.count("Launching 1 jobs locally") == 5
    assert "5 of the 5 trials run by this sweep failed" in proc.stderr


def test_difference_a_persistent_study_says_what_it_resumes_in_its_first_lines(tmp_path: Path) -> None:
    """Official: storage null (in memory), direction minimize. embft (documented difference): a
    persistent optuna.db that a rerun resumes, and maximize; the search's first lines say so."""
    from hydra_plugins.embft_optuna_sweeper.config import EmbftOptunaSweeperConf

    defaults = OmegaConf.structured(EmbftOptunaSweeperConf)
    assert defaults.direction == "maximize" and defaults.n_jobs == 1
    assert OmegaConf.to_container(defaults)["storage"] == "sqlite:///${hydra.runtime.cwd}/optuna.db"

    (tmp_path / "one").mkdir()
    run = ["hydra.sweeper.storage=sqlite:///optuna.db", "hydra.sweeper.n_trials=2"]  # in the launch folder
    first = _example("sphere.py", tmp_path / "one", *run).stdout.splitlines()
    second = _example("sphere.py", tmp_path / "one", *run[:1], "hydra.sweeper.n_trials=3").stdout.splitlines()
    head = "\n".join(line.split("] ", 1)[-1] for line in second[:6])
    assert f"Storage: sqlite:///{tmp_path}/one/optuna.db (persistent: rerunning this command resumes the study)" in head
    assert "Study name: sphere" in head and "Directions: ['minimize']" in head
    assert "Trials already in the study: 2 (2 COMPLETE); n_trials=3 is the study's total" in head
    assert "Trials already in the study: 0;" in "\n".join(first[:6])
    assert sum("Launching 1 jobs" in line for line in second) == 1  # the study's total, not 3 more


def test_difference_a_log_tag_on_range_is_honoured_or_refused_never_dropped() -> None:
    """Official: tag(log, range(...)) drops the log tag silently. embft (documented difference): an
    int range with step 1 is searched on a log scale; where Optuna has no such scale, one line says so."""
    assert parse_search_space({}, ["n=tag(log, range(1, 1024))"]).distributions["n"] == IntDistribution(
        1, 1024, log=True
    )
    with pytest.raises(ValueError, match="search parameter n: .*log-scaled int range needs step 1"):
        parse_search_space({}, ["n=tag(log, range(1, 1024, 2))"])
