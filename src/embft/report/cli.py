"""`embft report NAME`: write report.md and report.png for a study (and a search's Optuna plots)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from embft import names
from embft.errors import EmbftError
from embft.report import datasets
from embft.report.loading import load_runs
from embft.report.rendering import (
    SECONDS_IMAGE,
    SERVING_IMAGE,
    plot,
    plot_accuracy_vs_seconds,
    plot_accuracy_vs_serving,
    write_markdown,
)
from embft.report.summary import ranked_line, summarize, used_sentence


def _default_tracking_uri() -> str:
    # The project's store, as conf/tracking/mlflow.yaml: MLFLOW_TRACKING_URI is not read (see there).
    from embft.config import default_tracking_uri

    return default_tracking_uri()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="embft report", description="Write report.md and report.png for a study from MLflow."
    )
    parser.add_argument("name", nargs="+", help="MLflow experiment name(s) or embft.sweep tag value(s), pooled")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep only fine-tune runs with this param value (repeatable)",
    )
    parser.add_argument("--tracking-uri", default=None, help="default: the project store (mlruns/mlflow.db)")
    parser.add_argument(
        "--metric",
        default=None,
        help="score to report, e.g. accuracy_cosine or accuracy_logreg (default: from the runs' eval settings)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("experiments"), help="default: ./experiments")
    parser.add_argument("--output-name", default=None, help="folder under out-dir (default: name, / -> _)")
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL of a search (default: the study parent run's optuna.storage tag)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="across datasets: check that configuration A beats B on each (default: the best on validation)",
    )
    args = parser.parse_args(argv)

    where = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--where {item!r}: expected KEY=VALUE, e.g. variant.name=same_nib")
        where[key] = value
    title = " + ".join(args.name)
    uri = args.tracking_uri or _default_tracking_uri()
    # A missing sqlite file would silently be created as an empty store; say what is wrong instead.
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        print(f"error: no MLflow store at {uri} (pass --tracking-uri)", file=sys.stderr)
        return 1
    from mlflow.tracking import MlflowClient

    try:
        df = load_runs(MlflowClient(tracking_uri=uri), args.name, where)
        if df.empty:
            raise EmbftError(
                f"no experiment named {title!r} and no runs tagged "
                f"{names.SWEEP}={title!r} in {uri}" + (f" matching {where}" if where else "")
            )
        table, info = summarize(df, args.metric)
    except EmbftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    out = args.out_dir / (args.output_name or args.name[0].replace("/", "_"))
    out.mkdir(parents=True, exist_ok=True)
    seconds_png = plot_accuracy_vs_seconds(info, title, out / SECONDS_IMAGE)
    matrix = datasets.dataset_matrix(info, args.compare) if datasets.is_cross_dataset(info) else None
    body = datasets.markdown(matrix, table, info) if matrix else None
    md = write_markdown(table, info, title, out / "report.md", body=body, seconds_image=seconds_png and SECONDS_IMAGE)
    png = plot(table, info, title, out / "report.png")
    if matrix:
        print(datasets.plot(matrix, title, out / datasets.IMAGE))
    if seconds_png:
        print(seconds_png)
    serving_png = plot_accuracy_vs_serving(info, title, out / SERVING_IMAGE)  # where runs measured it
    if serving_png:
        print(serving_png)
    try:  # a search also gets Optuna's plots, in report.md and on its parent run
        from embft.report.search import add_search_section

        add_search_section(MlflowClient(tracking_uri=uri), args.name, md, storage=args.storage)
    except EmbftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    best = table[~table["configuration"].isin(list(info.baselines))].iloc[0]
    print(md)
    print(png)
    n_configs = len(table) - len(info.baselines)
    delta = "" if math.isnan(best["delta_mean"]) else f" (delta {best['delta_mean']:+.4f})"
    val = "" if math.isnan(best["val_accuracy_mean"]) else f"validation {best['val_accuracy_mean']:.4f}, "
    if matrix:  # the best per dataset is in each dataset's table; across them, the conclusion
        print(f"{title}: {used_sentence(info)}; {len(matrix.datasets)} datasets; {matrix.conclusion}")
        return 0
    if info.ranked_by is None:  # runs from before the validation split: nothing to choose on
        print(f"{title}: {used_sentence(info)}; {n_configs} configuration(s); {ranked_line(info)}")
        return 0
    print(
        f"{title}: {used_sentence(info)}; {n_configs} configuration(s); best by {info.ranked_by}: "
        f"{best['configuration']}: {val}test {best['accuracy_mean']:.4f}{delta}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
