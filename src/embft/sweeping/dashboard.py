"""``make optuna-dashboard``: a search's study storage in optuna-dashboard, on a loopback port.

``python -m embft.sweeping.dashboard [--storage URL] [--port 8080]``. The storage
is the search's ``hydra.sweeper.storage`` (SQLite or PostgreSQL); by default embft's searches' store,
``mlruns/optuna.db`` under the current folder. The server listens on 127.0.0.1 only: put it behind
an SSH tunnel or a proxy to reach it from elsewhere (it has no login of its own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"  # conf/experiment/search*.yaml: ${paths.root_dir}/mlruns/optuna.db
DEFAULT_PORT = 8080
HOST = "127.0.0.1"


def dashboard_url(port: int = DEFAULT_PORT, study_id: Optional[int] = None) -> str:
    base = f"http://{HOST}:{port}/dashboard"
    return base if study_id is None else f"{base}/studies/{study_id}"


def resolve_storage(url: str, cwd: Path) -> str:
    """The SQLAlchemy URL the dashboard opens: a relative SQLite path against ``cwd`` (which must
    exist: the dashboard would create an empty store), PostgreSQL with the installed driver."""
    from sqlalchemy.engine import make_url

    from embft.sweeping.storage import with_installed_pg_driver

    parsed = with_installed_pg_driver(make_url(url))
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "").expanduser()
        path = path if path.is_absolute() else cwd / path
        if not path.is_file():
            raise SystemExit(
                f"No study store at {path}: run a search first, or give --storage URL (make optuna-dashboard STORAGE=URL)"
            )
        parsed = parsed.set(database=str(path))
    return parsed.render_as_string(hide_password=False)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="the search's hydra.sweeper.storage URL")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    storage = resolve_storage(args.storage, Path.cwd())

    import optuna
    from optuna_dashboard import run_server
    from sqlalchemy.engine import make_url

    studies = optuna.get_all_study_summaries(storage)
    print(f"optuna-dashboard on {make_url(storage).render_as_string(hide_password=True)}: {dashboard_url(args.port)}")
    for s in studies:
        print(f"  {s.study_name}: {dashboard_url(args.port, s._study_id)} ({s.n_trials} trials)")
    sys.stdout.flush()
    run_server(storage, host=HOST, port=args.port)


if __name__ == "__main__":
    main()
