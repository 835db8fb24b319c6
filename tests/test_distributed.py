"""One job trained by several processes (train.nproc_per_node > 1, torchrun, gloo on CPU): the
command and config checks, and for real: a 2-process smoke job through the app, 2 processes x B/2
equal to 1 process x B without in-batch negatives, cross-device negatives, a failing worker."""

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_bert
from embft.errors import EmbftError
from embft.training.flagembedding import distributed
from embft.training.flagembedding.records import build_records, write_records
from embft.training.flagembedding.runner import RunnerSpec, check_parallel, effective_batch_size, runner_spec
from embft.training.flagembedding.train import train
from test_pipeline import embft, runs

# ---------------------------------------------------------------- fast: command, environment, config


def test_torchrun_command_runs_the_worker_module(tmp_path):
    cmd = distributed.torchrun_command(tmp_path / "spec.json", 3, tmp_path / "logs")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=3" in cmd
    assert cmd[-3:] == ["-m", "embft.training.flagembedding.distributed", str(tmp_path / "spec.json")]


def test_worker_env_splits_the_cores_and_keeps_a_users_choice():
    assert distributed.worker_env(2, base={}, cores=8)["OMP_NUM_THREADS"] == "4"
    assert distributed.worker_env(4, base={}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert distributed.worker_env(2, base={"OMP_NUM_THREADS": "3"}, cores=8)["OMP_NUM_THREADS"] == "3"
    assert distributed.worker_env(2, base={}, cores=2)["PYTHONUNBUFFERED"] == "1"


def test_ddp_backend_per_device():
    assert distributed.distributed_training_args("cpu") == {"ddp_backend": "gloo", "disable_tqdm": True}
    assert distributed.distributed_training_args("cuda")["ddp_backend"] == "nccl"


def test_runner_spec_is_plain_json_with_the_configs_settings(compose, tmp_path):
    cfg = compose(["variant=same", "train.nproc_per_node=2", "train.negatives_cross_device=true", "train.seed=7"])
    spec = runner_spec(cfg, tmp_path / "records", "/models/m", tmp_path / "bare", "fp32", "cpu")
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()
    assert spec.training_args["negatives_cross_device"] is True and spec.training_args["seed"] == 7
    assert spec.training_args["output_dir"] == str(tmp_path / "bare")
    assert spec.data_args["same_dataset_within_batch"] is True
    assert spec.model_args == {"model_name_or_path": "/models/m"}


def test_defaults_are_one_process_without_cross_device_negatives(compose):
    for train_group in ("default", "fast"):
        t = compose([f"train={train_group}"]).train
        assert (t.nproc_per_node, t.negatives_cross_device) == (1, False)


def test_nproc_per_node_is_typed(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["train.nproc_per_node=two"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.nproc_per_node=0"], "use 1"),
        (["variant=same", "train.negatives_cross_device=true"], "needs train.nproc_per_node > 1"),
        (
            ["variant=same_nib", "train.nproc_per_node=2", "train.negatives_cross_device=true"],
            "variant=same_nib trains without",
        ),
        (["variant=no_same_nib", "train.nproc_per_node=2", "train.negatives_cross_device=true"], "variant=no_same_nib"),
    ],
)
def test_bad_process_settings_are_refused(compose, overrides, message):
    cfg = compose(overrides)
    with pytest.raises(EmbftError, match=message):
        check_parallel(cfg.train, cfg.variant)


@pytest.mark.parametrize("variant", ["same", "no_same"])
def test_cross_device_negatives_are_accepted_for_in_batch_variants(compose, variant):
    cfg = compose(
        [f"variant={variant}", "train.nproc_per_node=2", "train.negatives_cross_device=true", "train.device=cpu"]
    )
    check_parallel(cfg.train, cfg.variant)


def test_effective_batch_size_counts_every_process(compose):
    cfg = compose(["train.nproc_per_node=2"])
    assert effective_batch_size(cfg.train, same_dataset=True) == 2  # (3 // 2) x 2
    assert effective_batch_size(cfg.train, same_dataset=False) == 6
    cfg.train.same_dataset_batch_size = 16
    assert effective_batch_size(cfg.train, same_dataset=True) == 32


def test_too_few_queries_for_one_global_step_is_refused(compose, tmp_path):
    cfg = compose(["variant=same_nib", "train.nproc_per_node=2", "train.same_dataset_batch_size=8", "train.device=cpu"])
    with pytest.raises(
        EmbftError, match=r"10 training queries do not fill one step of 16 queries \(2 process\(es\) x 8\)"
    ):
        train(cfg, tmp_path / "records", "/unused", 10, tmp_path / "job")


def test_failure_message_names_the_first_failing_rank(tmp_path):
    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / "rank1.json").write_text(json.dumps({"rank": 1, "error": "ValueError: the cause"}))
    os.utime(errors / "rank1.json", (1, 1))
    (errors / "rank0.json").write_text(json.dumps({"rank": 0, "error": "DistBackendError: peer closed"}))
    message = distributed.failure_message(errors, 1, 2, ["..."])
    assert "rank 1: ValueError: the cause" in message and "torchrun exit 1" in message
    died = distributed.failure_message(tmp_path / "none", -9, 2, ["last words", ""])
    assert "without a Python error" in died and "last words" in died


def test_launch_logs_worker_output_and_fails_with_one_error(tmp_path, monkeypatch, caplog):
    """A stand-in for torchrun: its lines reach the job's log, its failure becomes one EmbftError,
    and the launch's scratch folder is gone."""
    script = (
        "import json, pathlib, sys; spec = json.loads(pathlib.Path(sys.argv[1]).read_text()); "
        "print('[default0]:hello from a worker'); e = pathlib.Path(spec['error_dir']); e.mkdir(); "
        "(e / 'rank0.json').write_text(json.dumps({'rank': 0, 'error': 'RuntimeError: boom'})); sys.exit(1)"
    )
    monkeypatch.setattr(
        distributed,
        "torchrun_command",
        lambda spec_path, nproc, log_dir: [sys.executable, "-c", script, str(spec_path)],
    )
    spec = RunnerSpec("stock", "fp32", "cpu", {}, {}, {"output_dir": str(tmp_path / "bare")})
    with (
        caplog.at_level("INFO", logger="embft.training.flagembedding.distributed"),
        pytest.raises(EmbftError, match="rank 0: RuntimeError: boom"),
    ):
        distributed.launch(spec, 2, "cpu", work_parent=tmp_path)
    assert "[default0]:hello from a worker" in caplog.text
    assert not list(tmp_path.glob(".torchrun.*"))


# ---------------------------------------------------------------- slow: real torchrun, gloo, 2 processes


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """Without dropout, so that a 2-process run can be compared with a 1-process one."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_nodropout"), dropout=False)


def tiny_job(compose, tiny_bert, folder: Path, variant: str, batch: int, nproc: int, *overrides: str):
    """cfg and a records folder of 16 queries (3 negatives each) for `variant`, `batch` per process."""
    cfg = compose(
        [
            f"model.name_or_path={tiny_bert}",
            "model.package=null",
            "model.pooling=cls",
            f"variant={variant}",
            "train.num_train_epochs=1",
            "train.learning_rate=1e-3",
            "train.device=cpu",
            "train.logging_steps=1",
            "train.query_max_len=16",
            "train.passage_max_len=16",
            f"train.per_device_train_batch_size={batch}",
            f"train.same_dataset_batch_size={batch}",
            f"train.nproc_per_node={nproc}",
            *overrides,
        ]
    )
    rng = np.random.default_rng(0)
    words = ["sport", "market", "science", "war"]
    texts = [f"{words[i % 4]} story {rng.integers(1e6)}" for i in range(16)]
    records = folder / ("records-no_in_batch_neg" if cfg.variant.no_in_batch_neg else "records")
    records.mkdir(parents=True)
    same = cfg.variant.same_dataset_within_batch
    write_records(
        build_records(texts, [i % 4 for i in range(16)], group_size=4, seed=0, batch_size=batch if same else None),
        records / "train.jsonl",
    )
    return cfg, records


def weight_update(model_dir: Path, base: Path) -> torch.Tensor:
    from transformers import AutoModel

    after, before = AutoModel.from_pretrained(model_dir).state_dict(), AutoModel.from_pretrained(base).state_dict()
    return torch.cat([(after[k] - before[k]).flatten() for k in before])


@pytest.mark.slow
def test_two_processes_of_half_batch_train_like_one_process(compose, tmp_path, tiny_bert):
    """Without in-batch negatives (same_nib) DDP's averaged gradient over 2 x B/2 queries is the
    gradient over B: FlagEmbedding's same-dataset batches are global and sliced by rank, so both
    runs see the same 4 batches of 4 queries and must end with (nearly) the same weights."""
    cfg1, rec1 = tiny_job(compose, tiny_bert, tmp_path / "one", "same_nib", 4, 1)
    one = train(cfg1, rec1, str(tiny_bert), 16, tmp_path / "one")
    cfg2, rec2 = tiny_job(compose, tiny_bert, tmp_path / "two", "same_nib", 2, 2)
    two = train(cfg2, rec2, str(tiny_bert), 16, tmp_path / "two")

    assert one.effective_batch_size == two.effective_batch_size == 4 and one.n_queries == two.n_queries == 16
    assert [s for s, _ in one.losses] == [s for s, _ in two.losses] == [1, 2, 3, 4]
    np.testing.assert_allclose([loss for _, loss in two.losses], [loss for _, loss in one.losses], atol=2e-4)
    # Same kind of model folder: files, pooling and normalization modules.
    assert sorted(p.name for p in one.model_dir.iterdir()) == sorted(p.name for p in two.model_dir.iterdir())
    for name in ("modules.json", "1_Pooling/config.json"):
        assert (one.model_dir / name).read_text() == (two.model_dir / name).read_text()
    assert not list((tmp_path / "two").glob(".torchrun.*")) and not list((tmp_path / "two").glob(".flagembedding.*"))
    # Adam turns float-level gradient differences into small update differences; a different
    # batch order (another seed) gives ~50% here, DDP vs one process well under 5%.
    u1, u2 = weight_update(one.model_dir, tiny_bert), weight_update(two.model_dir, tiny_bert)
    assert u1.norm() > 0 and ((u1 - u2).norm() / u1.norm()).item() < 0.05


@pytest.mark.slow
def test_cross_device_negatives_score_every_processs_passages(compose, tmp_path, tiny_bert):
    """no_same with 2 processes x 2 queries x group 8: an untrained model scores near-uniformly, so
    the first loss is ~ln(number of passages each query is scored against): ln 32 across devices."""
    cfg, records = tiny_job(
        compose, tiny_bert, tmp_path, "no_same", 2, 2, "train.negatives_cross_device=true", "train.learning_rate=1e-6"
    )
    result = train(cfg, records, str(tiny_bert), 16, tmp_path / "job")
    first_loss = result.losses[0][1]
    assert abs(first_loss - math.log(2 * 2 * 8)) < 0.05, first_loss  # per-process in-batch only: ln 16 = 2.77


@pytest.mark.slow
def test_a_failing_worker_fails_the_job_with_one_error_and_no_model(compose, tmp_path, tiny_bert):
    cfg, records = tiny_job(compose, tiny_bert, tmp_path, "same_nib", 2, 2)
    with pytest.raises(EmbftError, match=r"nproc_per_node=2: training failed on rank \d: \w+"):
        train(cfg, records, str(tmp_path / "no_such_model"), 16, tmp_path / "job")
    assert not list((tmp_path / "job").iterdir()), "no model and no scratch folders may be left behind"


@pytest.mark.slow
def test_two_process_smoke_job_through_the_app(tmp_path, ag_news_dir, tiny_model):
    """`python -m embft experiment=smoke train.nproc_per_node=2`: one FINISHED MLflow run with the
    metric logged once, a SentenceTransformer folder that loads and encodes like the one-process kind."""
    from mlflow.tracking import MlflowClient
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    done = embft(
        tmp_path,
        "experiment=smoke",
        f"data.local_dir={ag_news_dir}",
        *tiny_model,
        "train.nproc_per_node=2",
        "train.keep_model=true",
        "eval.max_test_rows=100",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    print(f"2-process smoke job: {time.perf_counter() - start:.0f} s")
    assert "Training in 2 processes (gloo" in output and "[default1]:" in output  # workers' lines in the job log
    job_logs = list((tmp_path / "outputs" / "smoke").rglob("*.log"))
    assert any("[default0]:" in log.read_text() for log in job_logs), job_logs

    all_runs = runs(tmp_path, "smoke")
    tuned = [r for r in all_runs if r.data.tags["embft.role"] == "finetune"]
    assert len(tuned) == 1 and {r.info.status for r in all_runs} == {"FINISHED"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = tuned[0]
    assert len(client.get_metric_history(run.info.run_id, "accuracy_cosine")) == 1
    assert 0 <= run.data.metrics["accuracy_cosine"] <= 1
    assert run.data.metrics["effective_batch_size"] == 4  # smoke: (4 // 2) per process x 2 processes
    assert run.data.params["train.nproc_per_node"] == "2"

    model_dir = Path(run.data.tags["model_dir"])
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
    assert modules[1:] == ["Pooling", "Normalize"]
    pooling = json.loads((model_dir / "1_Pooling/config.json").read_text())
    assert pooling.get("pooling_mode", "mean" if pooling.get("pooling_mode_mean_tokens") else None) == "mean"  # MiniLM
    embeddings = SentenceTransformer(str(model_dir), device="cpu").encode(["stocks fell", "the match ended 2-1"])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)


FAILING_RANK_WORKER = """
import os, sys
if os.environ.get("RANK") == "1":  # only this rank breaks, at its second step; rank 0 stays healthy
    import transformers

    steps = []
    step = transformers.Trainer.training_step

    def failing_step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("rank 1 lost its disk")
        return step(self, *args, **kwargs)

    transformers.Trainer.training_step = failing_step
from embft.training.flagembedding.distributed import main
main()
"""


@pytest.mark.slow
def test_one_failing_rank_fails_the_job_naming_it_while_the_others_are_healthy(
    compose, tmp_path, tiny_bert, monkeypatch
):
    """Rank 1 dies mid-training while rank 0 waits in a collective: torchrun takes rank 0 down,
    the job fails within seconds with rank 1's error (not rank 0's broken collective), no model."""
    helper = tmp_path / "helper"
    helper.mkdir()
    (helper / "failing_rank_worker.py").write_text(FAILING_RANK_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(helper), *filter(None, [os.environ.get("PYTHONPATH")])]))
    real_command = distributed.torchrun_command
    monkeypatch.setattr(
        distributed,
        "torchrun_command",
        lambda spec_path, nproc, log_dir: [
            *real_command(spec_path, nproc, log_dir)[:-3],
            "-m",
            "failing_rank_worker",
            str(spec_path),
        ],
    )
    cfg, records = tiny_job(compose, tiny_bert, tmp_path, "same_nib", 2, 2)
    start = time.perf_counter()
    with pytest.raises(
        EmbftError, match=r"nproc_per_node=2: training failed on rank 1: RuntimeError: rank 1 lost its disk"
    ):
        train(cfg, records, str(tiny_bert), 16, tmp_path / "job")
    assert time.perf_counter() - start < 300, "rank 0 must not hang in its collective"
    assert not list((tmp_path / "job").iterdir()), "no model and no scratch folders may be left behind"


@pytest.mark.slow
def test_no_same_nib_trains_exactly_like_no_same(compose, tmp_path, tiny_bert):
    """FlagEmbedding 1.4.2 reads the no_in_batch_neg suffix only in same-dataset mode, so the
    study's no_same and no_same_nib rows are one training (README, Config groups)."""
    losses = {}
    for variant in ("no_same", "no_same_nib"):
        cfg, records = tiny_job(compose, tiny_bert, tmp_path / variant, variant, 4, 1)
        losses[variant] = train(cfg, records, str(tiny_bert), 16, tmp_path / variant / "job").losses
    assert len(losses["no_same"]) == 4 and losses["no_same_nib"] == losses["no_same"]
