"""The one MLflow run search (embft.tracking.run_search): every page, and tag values with quotes found
exactly. MLflow returns at most 1,000 runs a call; a small page size stands in for that limit."""

from pathlib import Path

import pytest

from embft import names
from embft.report.loading import load_runs
from embft.tracking import mlflow_runs, run_search

QUOTED = ["it's", 'say "hi"', "both ' and \"", "back\\slash", "50%_off"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient()
    return client, client.create_experiment("e")


def test_every_page_is_read(store):
    client, exp = store
    for i in range(7):
        run = client.create_run(exp, tags={names.SWEEP: "s", "i": str(i)})
        client.set_terminated(run.info.run_id, "FINISHED" if i % 3 else "FAILED")
    found = run_search.search_runs(client, [exp], {names.SWEEP: "s"}, page_size=2)
    assert sorted(int(r.data.tags["i"]) for r in found) == list(range(7))
    finished = run_search.search_runs(client, [exp], {names.SWEEP: "s"}, statuses=("FINISHED",), page_size=3)
    assert sorted(int(r.data.tags["i"]) for r in finished) == [1, 2, 4, 5]
    assert run_search.search_runs(client, [], {names.SWEEP: "s"}) == []


def test_find_runs_reads_past_one_page(store, monkeypatch):
    """A store that answers fewer runs a call than asked (MLflow's cap is 1,000) still gives them all."""
    from mlflow.tracking import MlflowClient

    client, exp = store
    for _ in range(5):
        client.set_terminated(client.create_run(exp, tags={names.SWEEP: "s"}).info.run_id)
    search = MlflowClient.search_runs

    def capped(self, *args, max_results=1000, **kwargs):
        return search(self, *args, max_results=min(max_results, 2), **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", capped)
    assert len(mlflow_runs.find_runs(exp, {names.SWEEP: "s"})) == 5


def test_tag_values_with_quotes_are_found_exactly(store):
    client, exp = store
    for value in [*QUOTED, 'both _ and "', "plain"]:
        client.set_terminated(client.create_run(exp, tags={names.SWEEP: value}).info.run_id)
    for value in QUOTED:
        found = mlflow_runs.find_runs(exp, {names.SWEEP: value})
        assert [r.data.tags[names.SWEEP] for r in found] == [value], value


def test_the_report_finds_a_sweep_whose_name_holds_a_quote(store):
    client, exp = store
    client.set_terminated(client.create_run(exp, tags={names.SWEEP: "it's", names.ROLE: "finetune"}).info.run_id)
    client.set_terminated(client.create_run(exp, tags={names.SWEEP: "other", names.ROLE: "finetune"}).info.run_id)
    assert len(load_runs(client, "it's")) == 1
