"""Access control: the MLflow server (basic-auth app) refuses requests without the right password,
and they change nothing; PostgreSQL takes scram passwords only (no trust)."""

import base64
import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow too: `-m "not slow"` must not need the services


def _call(uri: str, method: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of one REST call (no proxy: the server is on loopback)."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{uri}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mlflow_refuses_no_or_wrong_password_and_nothing_changes(mlflow_uri: str, mlflow_credentials) -> None:
    from mlflow.tracking import MlflowClient

    admin = (mlflow_credentials.user, mlflow_credentials.password)
    name = f"e2e_auth_{uuid.uuid4().hex[:8]}"
    create = ("POST", "/api/2.0/mlflow/experiments/create", {"name": name})
    search = ("GET", "/api/2.0/mlflow/experiments/search?max_results=10", None)
    assert _call(mlflow_uri, *search) == 401
    assert _call(mlflow_uri, *create) == 401
    assert _call(mlflow_uri, *create, auth=(admin[0], admin[1] + "x")) == 401
    assert _call(mlflow_uri, *create, auth=("nobody", admin[1])) == 401
    assert MlflowClient(tracking_uri=mlflow_uri).get_experiment_by_name(name) is None  # nothing was created
    assert _call(mlflow_uri, *search, auth=admin) == 200
    assert _call(mlflow_uri, "GET", "/health") == 200  # only the health check is open


def test_registry_alias_cannot_be_moved_without_the_password(smoke_sweep, mlflow_uri: str, mlflow_credentials) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    before = client.get_model_version_by_alias(smoke_sweep.name, "champion").version
    body = {"name": smoke_sweep.name, "alias": "champion", "version": "999"}
    path = "/api/2.0/mlflow/registered-models/alias"
    assert _call(mlflow_uri, "POST", path, body) == 401
    assert _call(mlflow_uri, "POST", path, body, auth=(mlflow_credentials.user, "wrong")) == 401
    assert _call(mlflow_uri, "DELETE", f"{path}?name={smoke_sweep.name}&alias=champion") == 401
    assert client.get_model_version_by_alias(smoke_sweep.name, "champion").version == before


def test_postgres_takes_passwords_only(pg_uri: str) -> None:
    import psycopg2

    pgpass = Path(os.environ["PGPASSFILE"])
    password = pgpass.read_text().strip().split(":")[-1]
    host, port = pg_uri.split("@")[1].split(":")
    base = dict(host=host, port=int(port), user="embft", dbname="optuna", connect_timeout=10)
    old = os.environ.pop("PGPASSFILE")
    try:
        for wrong in ("", "wrong"):
            with pytest.raises(psycopg2.OperationalError, match="password"):
                psycopg2.connect(**base, password=wrong, passfile=os.devnull)
        psycopg2.connect(**base, password=password).close()  # the password itself, as in a URL
    finally:
        os.environ["PGPASSFILE"] = old
    assert oct(pgpass.stat().st_mode & 0o777) == "0o600"  # libpq ignores a pgpass others can read
