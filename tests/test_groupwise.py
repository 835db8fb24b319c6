"""embft.training.flagembedding.groupwise and embft.encoding.precision: the groupwise loss equals FlagEmbedding's no-in-batch-negatives loss; runner and precision wiring."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from FlagEmbedding.finetune.embedder.encoder_only.base.modeling import BiEncoderOnlyEmbedderModel

import embft.encoding.precision as precision
import embft.training.flagembedding.groupwise as batched
from embft.encoding.precision import pick_precision, precision_training_kwargs
from embft.training.flagembedding.groupwise import GroupwiseEmbedderModel, GroupwiseEmbedderRunner, groupwise_scores

RTOL = 1e-10


def _models(temperature: float) -> tuple[BiEncoderOnlyEmbedderModel, GroupwiseEmbedderModel]:
    # Only the loss methods run, so the base model is a placeholder.
    return (
        BiEncoderOnlyEmbedderModel(torch.nn.Identity(), temperature=temperature),
        GroupwiseEmbedderModel(torch.nn.Identity(), temperature=temperature),
    )


def _inputs(n_queries: int, group: int, dim: int, normalize: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_queries, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    p = torch.randn(n_queries * group, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    return q, p, (lambda t: F.normalize(t, dim=-1)) if normalize else (lambda t: t)


def _loss_and_grads(loss_fn, q, p, prep):
    loss = loss_fn(prep(q), prep(p))
    return (loss.detach(), *torch.autograd.grad(loss, (q, p)))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().clamp_min(1e-300)
    assert ((actual - expected).abs().max() / scale).item() <= RTOL


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_queries,group", [(1, 8), (2, 2), (5, 8), (16, 3), (32, 8)])
@pytest.mark.parametrize("temperature", [0.02, 1.0])
def test_groupwise_loss_and_gradients_match_stock_and_per_query(n_queries, group, normalize, temperature):
    stock, groupwise = _models(temperature)
    q, p, prep = _inputs(n_queries, group, dim=24, normalize=normalize, seed=n_queries * 100 + group)

    ours = _loss_and_grads(lambda a, b: groupwise._compute_no_in_batch_neg_loss(a, b)[1], q, p, prep)
    theirs = _loss_and_grads(lambda a, b: stock._compute_no_in_batch_neg_loss(a, b)[1], q, p, prep)

    def per_query_mean(a, b):
        losses = [
            stock._compute_no_in_batch_neg_loss(a[i : i + 1], b[i * group : (i + 1) * group])[1]
            for i in range(n_queries)
        ]
        return torch.stack(losses).mean()

    mean_single = _loss_and_grads(per_query_mean, q, p, prep)
    for reference in (theirs, mean_single):
        for actual, expected in zip(ours, reference):
            _assert_close(actual, expected)


def test_groupwise_scores_are_the_stock_local_scores():
    stock, _ = _models(0.05)
    q, p, _ = _inputs(6, 4, dim=10, normalize=False, seed=0)
    scores = groupwise_scores(q, p, 0.05)
    assert scores.shape == (6, 4)
    _assert_close(scores, stock.compute_local_score(q, p))


def test_teacher_branch_is_the_stock_one():
    stock, groupwise = _models(0.02)
    q, p, _ = _inputs(3, 4, dim=8, normalize=True, seed=1)
    teacher = torch.softmax(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    # kl_div only: FlagEmbedding's m3_kd_loss expects the full (B, B*G) matrix and fails on local scores.
    _assert_close(
        groupwise._compute_no_in_batch_neg_loss(q, p, teacher_targets=teacher)[1],
        stock._compute_no_in_batch_neg_loss(q, p, teacher_targets=teacher)[1],
    )


def test_pick_precision(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert pick_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "fma"})
    assert pick_precision("auto", "cpu") == "fp32"
    assert pick_precision("auto", torch.device("cpu")) == "fp32"
    assert pick_precision("fp32", "cpu") == "fp32"
    assert pick_precision("bf16", "cpu") == "bf16"  # honoured, with a warning
    from embft.errors import EmbftError

    with pytest.raises(EmbftError, match="precision=fp16: choose one of auto, fp32, bf16"):
        pick_precision("fp16", "cpu")


def test_precision_kwargs_undo_the_leaked_accelerate_setting(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what TrainingArguments(bf16=True) leaves behind
    assert precision_training_kwargs("fp32", "cpu") == {"bf16": False, "use_cpu": True}
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    assert precision_training_kwargs("bf16", "cpu") == {"bf16": True, "use_cpu": True}
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with pytest.raises(ValueError):
        precision_training_kwargs("auto", "cpu")


@pytest.fixture
def tiny_model_dir(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "the a news sport stock market team game win loss price rise fall world war peace".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    folder = tmp_path / "tiny_bert"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder, words


def _train_losses(runner_cls, model_dir, records_dir, out_dir, cache_dir):
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderTrainingArguments,
    )

    runner = runner_cls(
        model_args=EncoderOnlyEmbedderModelArguments(model_name_or_path=str(model_dir)),
        data_args=EncoderOnlyEmbedderDataArguments(
            train_data=[str(records_dir)],
            cache_path=str(cache_dir),
            train_group_size=4,
            query_max_len=16,
            passage_max_len=16,
            same_dataset_within_batch=True,
        ),
        training_args=EncoderOnlyEmbedderTrainingArguments(
            output_dir=str(out_dir),
            max_steps=3,
            learning_rate=1e-3,
            per_device_train_batch_size=3,
            temperature=0.02,
            sentence_pooling_method="mean",
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            seed=7,
            **precision_training_kwargs("fp32", "cpu"),
        ),
    )
    runner.trainer.train()
    losses = [e["loss"] for e in runner.trainer.state.log_history if "loss" in e]
    return runner, losses


def test_runner_trains_the_groupwise_model_with_the_stock_losses(tiny_model_dir, tmp_path, monkeypatch):
    from FlagEmbedding.finetune.embedder.encoder_only.base import EncoderOnlyEmbedderRunner

    model_dir, words = tiny_model_dir
    records_dir = tmp_path / "records-no_in_batch_neg"
    records_dir.mkdir()
    gen = torch.Generator().manual_seed(0)

    def text() -> str:
        return " ".join(words[i] for i in torch.randint(len(words), (6,), generator=gen).tolist())

    with (records_dir / "train.jsonl").open("w") as fh:
        for _ in range(12):
            record = {
                "query": text(),
                "pos": [text()],
                "neg": [text() for _ in range(3)],
                "prompt": "",
                "type": "symmetric_class",
                "batch_size": 4,
            }
            fh.write(json.dumps(record) + "\n")

    calls = []
    monkeypatch.setattr(batched, "groupwise_scores", lambda *a: calls.append(a[0].shape) or groupwise_scores(*a))
    runner, ours = _train_losses(GroupwiseEmbedderRunner, model_dir, records_dir, tmp_path / "g", tmp_path / "c1")
    assert type(runner.model) is GroupwiseEmbedderModel and runner.trainer.model is runner.model
    assert calls and all(shape == (4, 16) for shape in calls)  # batch_size=4 honoured, groupwise path used
    _, theirs = _train_losses(EncoderOnlyEmbedderRunner, model_dir, records_dir, tmp_path / "s", tmp_path / "c2")
    assert len(ours) == len(theirs) == 3
    assert ours == pytest.approx(theirs, rel=1e-5)
