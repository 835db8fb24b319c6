"""experiment=advise: bad inputs refused in one line before anything is created; the recommendation's numbers
(paired by seed) computed as a reader would; and, on the tiny model, a small advise end to end (2 arms x 2
trials x 2 seeds): every stage, strict budgets read back from MLflow, the resume, the champion per dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from embft.errors import EmbftError

ARMS_DIR = Path(__file__).resolve().parents[1] / "conf" / "arm"
ARMS = sorted(p.stem for p in ARMS_DIR.glob("*.yaml"))


def _data(folder: Path, n_per_class: int = 30, classes=("a", "b", "c", "d"), seed: int = 0) -> Path:
    from test_data import synthetic, write

    return write(
        folder,
        synthetic(n_per_class=n_per_class, classes=classes, seed=seed),
        synthetic(classes=classes, seed=seed + 1),
    )


def _plan(compose, overrides, splits=None):
    from hydra_plugins.embft_advise_sweeper._plan import make_plan

    def arm_config(more):
        return compose([*overrides, *more])

    return make_plan(compose(overrides), overrides, compose=arm_config, options=ARMS, splits=splits)


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "more,expected",
    [
        (["advise.arms=[supcon,nope]"], "advise.arms: no arm 'nope' in conf/arm; choose from"),
        (
            ["advise.arms=[supcon,setfit,contrastive]", "advise.total_trials=5"],
            "advise.total_trials=5 gives each of the 3 arms 1 trial(s), under advise.min_trials_per_arm=2: raise it to 6",
        ),
        (["advise.trials_per_arm=1"], "advise.trials_per_arm=1: each arm needs at least advise.min_trials_per_arm=2"),
        (["advise.seeds=1"], "advise.seeds=1: a paired interval needs at least 2 training seeds"),
        (["train.per_class=null"], "experiment=advise needs train.per_class=N"),
        (["train.per_class=40"], "train.per_class=40: class '0' has 27 train rows"),
        (["advise.arms=[setfit]", "train.per_class=1"], "train.per_class=1: train.backend=setfit draws a same-class"),
    ],
)
def test_a_bad_advise_is_refused_in_one_line(compose, tmp_path, more, expected) -> None:
    folder = _data(tmp_path / "data")
    base = ["experiment=advise", "data=local", f"data.local_dir={folder}", "data.label_names=[]", "train.per_class=8"]
    with pytest.raises(EmbftError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as err:
        _plan(compose, [*base, *more])
    assert "\n" not in str(err.value)


def test_a_dataset_whose_validation_leaves_a_class_out_is_refused(compose, tmp_path) -> None:
    from embft.data import load_splits

    folder = _data(tmp_path / "data")
    base = ["experiment=advise", "data=local", f"data.local_dir={folder}", "data.label_names=[]", "train.per_class=4"]
    splits = load_splits(compose(base).data)
    splits.validation = splits.validation[splits.validation["label"] != 3]
    with pytest.raises(EmbftError, match="class '3' has no validation rows"):
        _plan(compose, base, splits=splits)


def test_the_default_arms_are_every_arm_with_a_search_space(compose, tmp_path) -> None:
    folder = _data(tmp_path / "data")
    plan = _plan(compose, ["experiment=advise", "data=local", f"data.local_dir={folder}", "data.label_names=[]"])
    searchable = [a for a in ARMS if "\nadvise:" in (ARMS_DIR / f"{a}.yaml").read_text()]
    assert (
        len(searchable) >= 9
        and plan.arms == searchable
        and plan.per_class == 8
        and plan.seeds == 3
        and plan.trials_per_arm == 8
    )
    assert {"train.learning_rate", "train.temperature"} <= set(plan.space("supcon"))
    assert "train.margin" in plan.space("batch_hard_triplet") and "train.margin" not in plan.space("setfit")


def test_the_advise_settings_are_no_jobs_setting(compose) -> None:
    """advise.* (set by an arm's file) neither enters a job's config hash nor its params: the trainers study's
    jobs keep their identity."""
    from embft.app import start

    plain, advised = start(compose(["arm=supcon"])), start(compose(["arm=supcon", "advise.seeds=5"]))
    assert plain.config_hash == advised.config_hash
    assert not any(k.startswith("advise") for k in plain.params)


@pytest.mark.parametrize("command", [["-m", "experiment=advise"], ["advise"]])  # the wrapper is the experiment
def test_a_bad_advise_on_the_command_line_creates_nothing(tmp_path, command) -> None:
    folder = _data(tmp_path / "data")
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [*command, "data=local", f"data.local_dir={folder}", "data.label_names=[]"]
    done = subprocess.run(
        [sys.executable, "-m", "embft", *args, "advise.arms=[supcon,nope]"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert [line for line in output.splitlines() if line.strip()] == [
        next(line for line in output.splitlines() if "advise.arms: no arm 'nope' in conf/arm; choose from" in line)
    ], output[-2000:]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists()


def test_a_label_budget_sweep_is_one_advise_per_cell() -> None:
    from hydra_plugins.embft_advise_sweeper._plan import cells

    line = ["data=trec,sst5", "train.per_class=8,64", "advise.seeds=2"]
    assert cells(line) == [
        ["data=trec", "train.per_class=8", "advise.seeds=2"],
        ["data=trec", "train.per_class=64", "advise.seeds=2"],
        ["data=sst5", "train.per_class=8", "advise.seeds=2"],
        ["data=sst5", "train.per_class=64", "advise.seeds=2"],
    ]
    plain = ["data=trec", "train.per_class=8", "advise.arms=[supcon,setfit]"]
    assert cells(plain) == [plain], "no sweep: the command line is the one cell, as written"


def test_reference_arms_are_confirmed_without_a_search(compose, tmp_path) -> None:
    folder = _data(tmp_path / "data")
    base = ["experiment=advise", "data=local", f"data.local_dir={folder}", "data.label_names=[]", "train.per_class=8"]
    plan = _plan(compose, [*base, "advise.arms=[supcon]", "advise.reference_arms=[untrained]"])
    assert plan.arms == ["supcon"] and plan.references == ["untrained"] and plan.confirmed == ["supcon", "untrained"]
    assert plan.configs["untrained"].train.backend == "untrained"
    with pytest.raises(EmbftError, match="advise.reference_arms: no arm 'nope' in conf/arm"):
        _plan(compose, [*base, "advise.arms=[supcon]", "advise.reference_arms=[nope]"])
    with pytest.raises(EmbftError, match="arm 'supcon' is also in advise.arms"):
        _plan(compose, [*base, "advise.arms=[supcon]", "advise.reference_arms=[supcon]"])
    with pytest.raises(EmbftError, match="arm 'untrained' has no search space.*advise.reference_arms"):
        _plan(compose, [*base, "advise.arms=[untrained]"])


def test_an_arms_fixed_overrides_hold_in_its_jobs_only(compose, tmp_path) -> None:
    folder = _data(tmp_path / "data")
    base = ["experiment=advise", "data=local", f"data.local_dir={folder}", "data.label_names=[]", "train.per_class=8"]
    fixed = "+advise.overrides.setfit=['train.num_iterations=20']"
    plan = _plan(compose, [*base, "advise.arms=[supcon,setfit]", fixed])
    assert plan.configs["setfit"].train.num_iterations == 20 and plan.configs["supcon"].train.num_iterations is None
    assert (
        plan.job("setfit")[-2:] == ["arm=setfit", "train.num_iterations=20"] and plan.job("supcon")[-1] == "arm=supcon"
    )
    assert _plan(compose, [*base, "advise.arms=[supcon]", fixed]).job("supcon")[-1] == "arm=supcon"
    with pytest.raises(EmbftError, match="advise.overrides: no arm 'setfti' in conf/arm; choose from"):
        _plan(compose, [*base, "advise.arms=[supcon]", "+advise.overrides.setfti=['train.num_iterations=20']"])


def test_an_arms_recipe_is_its_searchs_first_point_where_its_space_allows(compose, tmp_path) -> None:
    folder = _data(tmp_path / "data")
    base = ["experiment=advise", "data=local", f"data.local_dir={folder}", "data.label_names=[]", "train.per_class=8"]
    plan = _plan(compose, [*base, "advise.arms=[supcon,batch_hard_triplet]", "train.num_train_epochs=2"])
    assert plan.recipe_trial
    # conf/arm/supcon.yaml's settings; the command line's epochs is no searched key any more
    assert plan.recipe("supcon") == (
        {"train.learning_rate": 3.0e-4, "train.per_device_train_batch_size": 32, "train.temperature": 0.1},
        [],
    )
    # batch_hard_triplet's margin is the loss's default (unset): the sampler draws it
    assert plan.recipe("batch_hard_triplet") == (
        {"train.learning_rate": 1.0e-4, "train.per_device_train_batch_size": 16},
        ["train.margin"],
    )
    # a recipe outside its space is left to the sampler, not refused: the study path's batch is not in choice(2, 4, 8)
    plan = _plan(compose, [*base, "advise.arms=[fe_study]", "train.num_train_epochs=2"])
    assert plan.configs["fe_study"].train.per_device_train_batch_size not in (2, 4, 8)
    assert plan.recipe("fe_study") == (
        {"train.learning_rate": 1.0e-5, "train.temperature": 0.02},
        ["train.per_device_train_batch_size"],
    )
    assert not _plan(compose, [*base, "advise.arms=[supcon]", "advise.recipe_trial=false"]).recipe_trial


def test_the_label_budget_experiment_reports_each_cell_in_its_own_folder(compose, tmp_path) -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from conftest import CONF_DIR

    compose([])  # the schema registered, GlobalHydra cleared
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        overrides = [f"paths.root_dir={tmp_path}", "experiment=label_budget", "data=trec", "train.per_class=16"]
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    assert cfg.name == "label_budget" and list(cfg.advise.reference_arms) == ["untrained"]
    assert list(cfg.advise.overrides.setfit) == ["train.num_iterations=20"], "SetFit's pairs as its paper drew them"
    assert cfg.tracking.registered_model_name == "label_budget_trec_16"
    assert cfg.hydra.sweeper.report_dir.endswith("experiments/label_budget/trec_16")
    assert cfg.hydra.sweeper.summary_dir.endswith("experiments/label_budget")


# -------------------------------------------------------------------------------------- the report


def test_the_recommendation_is_the_paired_difference_by_seed(tmp_path) -> None:
    from embft.report import advise

    rows = []
    for seed, (a, b, base) in enumerate([(0.80, 0.70, 0.60), (0.84, 0.76, 0.60), (0.82, 0.71, 0.60)], start=1):
        for arm, val, seconds in (("supcon", a, 10.0), ("setfit", b, 100.0), ("untrained", base, 0.0)):
            rows.append(
                {
                    "arm": arm,
                    "seed": str(seed),
                    "backend": "untrained" if arm == "untrained" else "sentence_transformers",
                    "val_accuracy_cosine": val,
                    "delta_val_accuracy_cosine": val - base,
                    "accuracy_cosine": val - 0.01,
                    "delta_accuracy_cosine": val - 0.01 - base,
                    "train_seconds": seconds,
                    "train_labelled_texts": 32.0,
                }
            )
    budget = advise.Budget(data="toy", per_class=8, trials_per_arm=2, seeds=3, arms=["supcon", "setfit"])
    result = advise.write(pd.DataFrame(rows), budget, tmp_path, metric="val_accuracy_cosine")
    assert result.best_arm == "supcon"
    diffs = pd.Series([0.10, 0.08, 0.11])  # by seed, by hand
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / 3**0.5
    first = result.paired.iloc[0]
    assert first["versus"] == "setfit" and first["mean"] == pytest.approx(diffs.mean())
    assert first["low"] == pytest.approx(diffs.mean() - half) and first["time_ratio"] == pytest.approx(0.1)
    expected = f"use supcon: +{100 * diffs.mean():.1f} [+{100 * (diffs.mean() - half):.1f}, +{100 * (diffs.mean() + half):.1f}] points over setfit, at 0.1 times its training time"
    assert expected in result.sentence
    assert result.paired["versus"].tolist() == ["setfit", "untrained model"], "the untrained model once, by name"
    supcon = result.arms.set_index("arm").loc["supcon"]
    assert supcon["val_low"] < supcon["val"] and supcon["val_high"] < 1.0
    wide = advise.summarize(
        pd.DataFrame({"arm": "a", "seed": ["1", "2"], "val_accuracy_cosine": [0.99, 0.70]}),
        "val_accuracy_cosine",
        "logreg",
    ).iloc[0]
    assert (wide["val_low"], wide["val_high"]) == (0.0, 1.0), "an accuracy's interval stays within [0, 1]"
    assert result.paired["mean"].iloc[1] == pytest.approx(pd.Series([0.20, 0.24, 0.22]).mean())
    assert (tmp_path / "advise.png").is_file() and json.loads((tmp_path / "advise.json").read_text())[
        "best_arm"
    ] == "supcon"
    assert result.sentence in (tmp_path / "advise.md").read_text()


def _cell(
    folder: Path, data: str, per_class: int, arms: dict[str, tuple[float, float]], best: str, paired: tuple = ()
) -> None:
    """An advise.json as the sweeper writes it: arm -> (validation kNN, test deployed)."""
    rows = []
    for arm, (val, test) in arms.items():
        row = {"arm": arm, "n_seeds": 3, "val": val, "test": test - 0.01, "train_seconds": 5.0, "baseline_test": 0.5}
        for key, mean in (("test_served", test), ("test", test - 0.01)):
            row.update({key: mean, f"{key}_low": mean - 0.02, f"{key}_high": mean + 0.02})
        rows.append(row)
    cell = folder / f"{data}_{per_class}"
    cell.mkdir(parents=True)
    budget = {"data": data, "per_class": per_class, "trials_per_arm": 4, "seeds": 3, "arms": list(arms)}
    budget |= {"chosen": {best: "train.learning_rate=0.001"}, "recipe_trial": per_class == 64}
    (cell / "advise.json").write_text(
        json.dumps(
            {"sentence": f"use {best}", "best_arm": best, "budget": budget, "arms": rows, "paired": list(paired)}
        )
    )


def test_the_label_budget_summary_shows_every_cell_and_its_choice(tmp_path) -> None:
    from embft.report import label_budget

    _cell(tmp_path, "trec", 8, {"supcon": (0.7, 0.72), "untrained": (0.6, 0.65)}, "supcon")
    _cell(tmp_path, "trec", 64, {"supcon": (0.8, 0.83), "untrained": (0.82, 0.84)}, "untrained")
    paired = [
        {"versus": "supcon", "mean": 0.031, "low": 0.004, "high": 0.058, "time_ratio": 40.2, "outcome": "win"},
        {"versus": "bht", "mean": 0.006, "low": -0.03, "high": 0.04, "time_ratio": 38.0, "outcome": "tie"},
        {"versus": "untrained model", "mean": 0.02, "low": 0.01, "high": 0.03, "time_ratio": None, "outcome": "win"},
    ]
    arms = {"setfit": (0.3, 0.31), "supcon": (0.269, 0.27), "bht": (0.294, 0.3), "untrained": (0.28, 0.29)}
    _cell(tmp_path, "sst5", 8, arms, "setfit", paired)
    cells = label_budget.load_cells(tmp_path)
    assert len(cells) == 8 and set(cells["cell"]) == {"trec_8", "trec_64", "sst5_8"}
    assert label_budget.main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md.index("## sst5, 8 per class") < md.index("## trec, 8 per class") < md.index("## trec, 64 per class")
    glance = md[: md.index("## sst5")]
    # the runner-up is the next arm by validation kNN (bht), not the first pair listed (supcon)
    assert "| sst5 | 8 | setfit | bht | +0.6 [-3.0, +4.0] | tie | 38x | +2.0 [+1.0, +3.0] |" in glance
    assert "| trec | 8 | supcon |  |  |  |  |  |" in glance, "a cell without pairs still has its line"
    trec_64 = md[md.index("## trec, 64 per class") :]
    assert "| **untrained** | 3 | 84.0 [82.0, 86.0] | 83.0 [81.0, 85.0] | 82.0 |" in trec_64, "the choice is bold"
    assert "| supcon | 3 | 83.0" in trec_64
    trec_8 = md[md.index("## trec, 8 per class") : md.index("## trec, 64 per class")]
    assert (
        "4 search trials per arm on validation (pruned), then seeds 1..3. supcon: `train.learning_rate=0.001`" in trec_8
    )
    assert "the first at the arm's own recipe" in trec_64 and "own recipe" not in trec_8, "which protocol a cell ran"
    assert (tmp_path / "accuracy_vs_per_class.png").stat().st_size > 10_000
    assert label_budget.main([str(tmp_path / "empty")]) == 1


# ------------------------------------------------------------------------------- end to end (tiny)


def advise_overrides(
    data: Path, model: Path, name: str, arms: str, experiment: str = "advise", per_class: str = "6"
) -> list[str]:
    """A small advise on the tiny model: 2 trials and 2 seeds an arm, short texts, one kNN experiment."""
    return [
        f"experiment={experiment}",
        "data=local",
        f"data.name={name}",
        f"data.local_dir={data}",
        "data.label_names=[]",
        "data.validation=0.25",
        "model.package=null",
        f"model.name_or_path={model}",
        "eval.max_seq_length=32",
        "eval.samples_per_label=4",
        "eval.n_experiments=1",
        f"train.per_class={per_class}",
        "train.logging_steps=2",
        "train.per_device_train_batch_size=8",  # replaces the arms' batch choice: 24 texts fill 3 batches
        "train.num_train_epochs=1",
        f"advise.arms=[{arms}]",
        "advise.trials_per_arm=2",
        "advise.seeds=2",
        "advise.live_evals=2",
        "+advise.overrides.setfit=['train.num_iterations=1']",  # fixed in every setfit job (48 pairs, not 432)
    ]


def _advise(
    root: Path, data: Path, model: Path, name: str, arms: str, experiment: str = "advise", per_class: str = "6"
) -> subprocess.CompletedProcess:
    from test_pipeline import embft

    return embft(root, "-m", *advise_overrides(data, model, name, arms, experiment, per_class))


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    """One small advise on the tiny model (supcon and setfit, 2 trials, 2 seeds), then the same command again."""
    from conftest import make_tiny_bert

    base = tmp_path_factory.mktemp("advise")
    model, data, root = make_tiny_bert(base / "tiny"), _data(base / "alpha"), base / "root"
    first = _advise(root, data, model, "alpha", "supcon,setfit")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    before = _runs(root, "advise_alpha_6")
    again = _advise(root, data, model, "alpha", "supcon,setfit")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    return {"root": root, "model": model, "base": base, "first": first, "again": again, "before": before}


def _runs(root: Path, experiment: str):
    from test_pipeline import runs

    return runs(root, experiment)


def _tuned(runs):
    return [r for r in runs if r.data.tags.get("embft.role") == "finetune"]


@pytest.mark.slow
def test_an_advise_searches_each_arm_confirms_over_seeds_reports_and_registers(advised) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    from embft import names

    root = advised["root"]
    runs = advised["before"]
    tuned = _tuned(runs)
    studies = {r.data.tags[names.OPTUNA_STUDY] for r in tuned}
    search = sorted(s for s in studies if not s.endswith("/seeds"))
    assert len(search) == 2 and {s.rsplit("/", 1)[1] for s in search} == {"supcon", "setfit"}
    storage = f"sqlite:///{root}/mlruns/optuna.db"
    for study in search:  # a budgeted search of the arm's own settings, on validation
        trials = optuna.load_study(study_name=study, storage=storage).trials
        assert len(trials) == 2 and "train.learning_rate" in trials[0].params
        recipe = {"supcon": 3.0e-4, "setfit": 2.0e-5}[study.rsplit("/", 1)[1]]  # conf/arm's learning rates
        first = next(
            r for r in tuned if r.data.tags[names.OPTUNA_STUDY] == study and r.data.tags["optuna.trial_number"] == "0"
        )
        assert trials[0].params["train.learning_rate"] == recipe == float(first.data.params["train.learning_rate"])
    seeds = [r for r in tuned if r.data.tags[names.OPTUNA_STUDY].endswith("/seeds")]
    assert sorted((r.data.tags[names.OPTUNA_STUDY].split("/")[-2], r.data.params["train.seed"]) for r in seeds) == [
        ("setfit", "1"),
        ("setfit", "2"),
        ("supcon", "1"),
        ("supcon", "2"),
    ]
    assert all(r.info.status == "FINISHED" for r in seeds)
    # advise.overrides held in every job of its arm, searched and confirmed, and in no other arm's
    assert {r.data.params["train.num_iterations"] for r in tuned if "/setfit" in r.data.tags[names.OPTUNA_STUDY]} == {
        "1"
    }
    supcon = [r for r in tuned if "/supcon" in r.data.tags[names.OPTUNA_STUDY]]
    assert supcon and not any("train.num_iterations" in r.data.params for r in supcon), "a SetFit setting, unread"
    report = root / "experiments" / "advise" / "alpha_6"
    md = (report / "advise.md").read_text()
    summary = json.loads((report / "advise.json").read_text())
    best = summary["best_arm"]
    assert f"For this data (alpha) at 6 per class, use {best}:" in md and (report / "advise.png").is_file()
    assert "points over" in summary["sentence"] and "untrained model" in md
    assert summary["budget"]["recipe_trial"] and "the first at the arm's own recipe" in md, "which protocol ran"
    # the recommendation on the study's MLflow parent run
    parent = next(r for r in runs if r.data.tags.get("embft.role") == "study" and r.data.tags.get("advise.best_arm"))
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    assert {"advise/advise.md", "advise/advise.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "advise")
    }
    # the recommended arm's best seed is advise_alpha_6@champion
    champion = client.get_model_version_by_alias("advise_alpha_6", names.CHAMPION)
    chosen = [r for r in seeds if r.data.tags[names.OPTUNA_STUDY].split("/")[-2] == best]
    top = max(r.data.metrics["val_accuracy_cosine"] for r in chosen)
    assert champion.run_id in {r.info.run_id for r in chosen if r.data.metrics["val_accuracy_cosine"] == top}


@pytest.mark.slow
def test_every_arm_reads_exactly_the_budgeted_labels(advised) -> None:
    """Strict budgets, from the store: every run of every arm (searches and seeds) read 6 texts x 4 classes."""
    tuned = _tuned(advised["before"])
    assert tuned and all(
        r.data.metrics["train_labelled_texts"] == 6 * 4 for r in tuned if "train_labelled_texts" in r.data.metrics
    )
    finished = [r for r in tuned if r.info.status == "FINISHED" and r.data.tags.get("optuna.pruned") != "true"]
    assert finished and all(r.data.metrics["train_labelled_texts"] == 24 for r in finished)
    assert all(r.data.metrics["train_per_class"] == 6 for r in finished)


@pytest.mark.slow
def test_a_rerun_trains_nothing(advised) -> None:
    after = _tuned(_runs(advised["root"], "advise_alpha_6"))
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in _tuned(advised["before"]))
    assert "skipped (already FINISHED)" in advised["again"].stdout + advised["again"].stderr


@pytest.mark.slow
def test_a_label_budget_sweep_advises_each_cell_beside_the_untrained_model(advised) -> None:
    """experiment=label_budget on a second dataset at two budgets: one advise per cell (its own studies, report
    and champion), the untrained reference arm confirmed with no search and no training, the summary over the
    cells; the first dataset's champion stays where it was."""
    from mlflow.tracking import MlflowClient

    from embft import names

    root = advised["root"]
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    alpha = client.get_model_version_by_alias("advise_alpha_6", names.CHAMPION)
    beta_data = _data(advised["base"] / "beta", classes=("x", "y", "z"), seed=5)
    done = _advise(root, beta_data, advised["model"], "beta", "supcon", experiment="label_budget", per_class="4,6")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    tuned = _tuned(_runs(root, "label_budget"))
    for n in (4, 6):
        champion = client.get_run(client.get_model_version_by_alias(f"label_budget_beta_{n}", names.CHAMPION).run_id)
        assert champion.data.tags["data"] == "beta" and champion.data.metrics["train_labelled_texts"] == n * 3
        cell = [r for r in tuned if r.data.params["train.per_class"] == str(n)]
        studies = {r.data.tags[names.OPTUNA_STUDY] for r in cell}
        assert {s.split("/")[-2] if s.endswith("/seeds") else s.split("/")[-1] for s in studies} == {
            "supcon",
            "untrained",
        }
        assert not any(s.endswith("/untrained") for s in studies), "a reference arm is not searched"
        untrained = [r for r in cell if r.data.tags[names.OPTUNA_STUDY].endswith("/untrained/seeds")]
        assert sorted(r.data.params["train.seed"] for r in untrained) == ["1", "2"]
        for run in untrained:  # its scores are the base model's; its deployed classifier read the same texts
            m = run.data.metrics
            assert m["train_seconds"] == 0 and m["delta_val_accuracy_cosine"] == pytest.approx(0, abs=1e-9)
            assert m["train_labelled_texts"] == n * 3 and "served_accuracy_logreg" in m
        summary = json.loads((root / "experiments" / "label_budget" / f"beta_{n}" / "advise.json").read_text())
        assert {a["arm"] for a in summary["arms"]} == {"supcon", "untrained"}
    report = (root / "experiments" / "label_budget" / "report.md").read_text()
    assert "## beta, 4 per class" in report and "## beta, 6 per class" in report
    assert (root / "experiments" / "label_budget" / "accuracy_vs_per_class.png").is_file()
    assert client.get_model_version_by_alias("advise_alpha_6", names.CHAMPION).version == alpha.version
    assert client.get_run(alpha.run_id).data.tags["data"] == "alpha"
