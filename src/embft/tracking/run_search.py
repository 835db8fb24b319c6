"""The one MLflow run search: every page of the results (MLflow returns at most `max_results` a call,
then a page token), and tag values matched exactly whatever quotes they hold.

MLflow's filter strings take the text between the quotes as it stands (no escapes: `'it\\'s'` matches
nothing), so a value is quoted by the quote it lacks; one holding both kinds is found with LIKE (its
quotes as `_`) and then kept only where the tag is equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

PAGE = 1000  # MLflow's largest page for search_runs


def _condition(key: str, value: str) -> tuple[str, bool]:
    """(a filter condition for tag `key` == `value`, whether the results need an exact check)."""
    if "'" not in value:
        return f"tags.`{key}` = '{value}'", False
    if '"' not in value:
        return f'tags.`{key}` = "{value}"', False
    return "tags.`{}` LIKE '{}'".format(key, value.replace("'", "_")), True


def search_runs(
    client: Any,
    experiment_ids: Iterable[str],
    tags: Optional[Mapping[str, str]] = None,
    filter_string: str = "",
    statuses: Optional[Iterable[str]] = None,
    page_size: Optional[int] = None,
) -> list:
    """Every run of the experiments whose tags equal `tags` and that match `filter_string` (MLflow's
    syntax), optionally only those in `statuses`; in MLflow's order, all pages."""
    ids = list(experiment_ids)
    if not ids:
        return []
    conditions, exact = [filter_string] if filter_string else [], {}
    for key, value in (tags or {}).items():
        condition, check = _condition(key, str(value))
        conditions.append(condition)
        if check:
            exact[key] = str(value)
    query = " and ".join(conditions)
    runs, token = [], None
    while True:
        page = client.search_runs(ids, filter_string=query, max_results=page_size or PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    wanted = None if statuses is None else set(statuses)
    return [
        r
        for r in runs
        if (wanted is None or r.info.status in wanted) and all(r.data.tags.get(k) == v for k, v in exact.items())
    ]
