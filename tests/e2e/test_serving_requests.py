"""Bad requests to the served classifier: `mlflow models serve` on loopback answers each of a matrix
of bad inputs with a 4xx and one message naming the problem (or, for a 1 MB text, a label), keeps
answering afterwards, and stays within a memory bound; `embft predict` refuses the same bad texts.

A tiny random BERT stands in for the fine-tuned embedder (what is checked is the input handling of
embft/serving/classifier.py and MLflow's scoring server, not the labels' quality), logged by
embft.serving.models.log_models into a throwaway sqlite store: no tracking server is needed.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from model_server import PeakRss

from .test_model_serving import _serve, _stop

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TEXTS = [
    "The central bank raised interest rates again as inflation stayed high.",
    "The striker scored twice as the home side won the cup final.",
    "A new chip promises faster phones with longer battery life.",
    "Rebels and government forces agreed to a ceasefire after talks.",
]
LONG_TEXTS = 8  # 1 MB texts in one request: tokenized whole, they added ~400 MB here, cut ~50 MB
JSON = "application/json"
GROWTH_MB = 250  # the most the server's memory may grow over the matrix (after its warm-up)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, ag_news_dir: Path) -> tuple[str, str]:
    """(model URI, tracking URI) of a kNN classifier over a tiny BERT, as a job logs it."""
    import mlflow
    from sentence_transformers import SentenceTransformer, models

    from conftest import make_tiny_bert
    from embft.serving.models import log_models

    folder = tmp_path_factory.mktemp("served")
    word = models.Transformer(str(make_tiny_bert(folder / "bert")), max_seq_length=64)
    embedder = SentenceTransformer(
        modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")], device="cpu"
    )
    embedder.save(str(folder / "st"))
    uri = f"sqlite:///{folder}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("requests", artifact_location=(folder / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            model_uri = log_models(
                folder / "st",
                pd.read_csv(ag_news_dir / "train.csv", nrows=200),
                LABELS,
                k=3,
                metric="cosine",
                support_per_class=20,
                seed=0,
            )
    finally:
        mlflow.set_tracking_uri(previous)
    return model_uri, uri


def _post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 120) -> tuple[int, str]:
    """(status, body) of a POST to /invocations; content_type None sends no Content-Type."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def _split(rows: list, columns: tuple = ("text",)) -> bytes:
    return json.dumps({"dataframe_split": {"columns": list(columns), "data": rows}}).encode()


def _message(body: str) -> str:
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return body


@pytest.fixture(scope="module")
def server(classifier, tmp_path_factory):
    model_uri, tracking_uri = classifier
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process, url = _serve(model_uri, env, log)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                assert _ping(url) == 200
                break
            except OSError:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 300 s"
                time.sleep(1)
        yield process, url, log
    finally:
        _stop(process)


def _ping(url: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/ping")
        return connection.getresponse().status
    finally:
        connection.close()


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_answering(classifier, server) -> None:
    import mlflow

    from embft.serving.classifier import MAX_ROWS

    process, url, log = server
    model_uri, tracking_uri = classifier
    mlflow.set_tracking_uri(tracking_uri)
    expected = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"text": TEXTS}))["label_name"].tolist()
    long_text = (TEXTS[0] + " ") * (1_000_000 // (len(TEXTS[0]) + 1) + 1)
    # (name, body, content type, status, what the message must say)
    matrix = [
        ("missing text column", _split([["x"]], ("body",)), JSON, 400, "missing inputs ['text']"),
        ("null text", _split([[TEXTS[0]], [None]]), JSON, 400, "row 1 is null"),
        ("null, records", json.dumps({"dataframe_records": [{"text": None}]}).encode(), JSON, 400, "row 0 is null"),
        ("a number", _split([[42]]), JSON, 400, "row 0 is a number (int)"),
        ("an empty string", _split([[""]]), JSON, 400, "row 0 is empty"),
        ("whitespace only", _split([[" \t\n "]]), JSON, 400, "row 0 is whitespace only"),
        ("non-JSON", b"text=hello", JSON, 400, "valid JSON"),
        ("10,000 rows", _split([[TEXTS[0]]] * 10_000), JSON, 400, f"at most {MAX_ROWS}"),
        ("wrong content type", _split([[TEXTS[0]]]), "text/plain", 415, "content types"),
    ]
    failures = []
    with PeakRss(process.pid) as rss:
        assert _post(url, _split([[t] for t in TEXTS]))[0] == 200  # warm: the first call initialises lazily
        baseline = rss.now()
        for name, body, content_type, status, says in matrix:
            got, text = _post(url, body, content_type)
            message = _message(text)
            if got != status or says not in message:
                failures.append(f"{name}: {got} {message[:300]!r} (wanted {status}, {says!r})")
        # MLflow's, not ours: no Content-Type at all gets a bare 500 (its scoring server splits None).
        got, text = _post(url, _split([[TEXTS[0]]]), None)
        assert got >= 400, (got, text[:300])
        # Documented answers, not errors: a 1 MB text gets the label of its first max_seq_length
        # tokens; a request of exactly MAX_ROWS rows is answered; no rows get no predictions.
        got, text = _post(url, _split([[long_text]] * LONG_TEXTS + [[(TEXTS[0] + " ") * 40]]))
        if got != 200:
            failures.append(f"1 MB texts: {got} {_message(text)[:300]!r}")
        else:
            *long, short = json.loads(text)["predictions"]
            assert long == [short] * LONG_TEXTS, "a 1 MB text should get the label and scores of its first 64 tokens"
        got, text = _post(url, _split([[TEXTS[i % 4]] for i in range(MAX_ROWS)]))
        assert got == 200 and len(json.loads(text)["predictions"]) == MAX_ROWS, (got, text[:300])
        got, text = _post(url, _split([]))
        assert (got, json.loads(text)) == (200, {"predictions": []})
        # Still answering, with the in-process model's labels.
        assert _ping(url) == 200
        got, text = _post(url, _split([[t] for t in TEXTS]))
        assert got == 200 and [p["label_name"] for p in json.loads(text)["predictions"]] == expected
    growth_mb = (rss.peak - baseline) / 2**20
    assert not failures, "\n".join(failures)
    assert process.poll() is None, log.read_text()[-3000:]
    assert growth_mb < GROWTH_MB, f"the server grew by {growth_mb:.0f} MB over the matrix"
    print(f"server RSS: {baseline / 2**20:.0f} MB after warm-up, peak {rss.peak / 2**20:.0f} MB")


def test_embft_predict_refuses_the_same_texts_and_reads_a_file_past_the_cap(classifier, tmp_path: Path, capsys) -> None:
    from embft.serving import predict as serving
    from embft.serving.classifier import MAX_ROWS

    model_uri, tracking_uri = classifier
    pd.DataFrame({"text": [TEXTS[0], None, "", "   ", 42]}).to_json(
        tmp_path / "bad.jsonl", orient="records", lines=True
    )
    capsys.readouterr()
    assert serving.predict_main([model_uri, str(tmp_path / "bad.jsonl"), "--tracking-uri", tracking_uri]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "row 1 is null, row 2 is empty, row 3 is whitespace only, row 4 is a number (int)" in err

    pd.DataFrame({"text": ["42", "7"]}).to_csv(tmp_path / "numbers.csv", index=False)  # a csv holds texts
    assert serving.predict_main([model_uri, str(tmp_path / "numbers.csv"), "--tracking-uri", tracking_uri]) == 0
    rows = pd.DataFrame({"text": [TEXTS[i % 4] for i in range(MAX_ROWS + 8)], "id": range(MAX_ROWS + 8)})
    rows.to_csv(tmp_path / "many.csv", index=False)
    out = tmp_path / "out.csv"
    assert (
        serving.predict_main([model_uri, str(tmp_path / "many.csv"), "--out", str(out), "--tracking-uri", tracking_uri])
        == 0
    )
    labels = pd.read_csv(out)
    assert labels["id"].tolist() == rows["id"].tolist() and labels["label_name"].notna().all()
    assert labels["label_name"].iloc[:4].tolist() == labels["label_name"].iloc[MAX_ROWS : MAX_ROWS + 4].tolist()
