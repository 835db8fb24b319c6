"""`embft report NAME`: a study report (markdown table + plot) from the MLflow runs of a study.

NAME is an MLflow experiment name or an `embft.sweep` tag value; several NAMEs are pooled, and
`--where KEY=VALUE` keeps only the fine-tune runs with that param (to borrow identical runs from
another study, e.g. `embft report pairing seed_grid --where variant.name=same_nib`). Usable runs are FINISHED
fine-tune runs with the report's metric (`--metric`; default from the runs' eval settings, e.g.
`accuracy_cosine` for kNN/cosine); they are grouped into configurations by the params that vary
across them (training seeds excluded), and each configuration gets its mean and spread over seeds,
compared with the untrained model's baseline. Configurations are ranked by the validation score
(`val_<metric>`) where the runs have it: choices are made on validation, test is reported beside it.
Runs that vary `data.name` also get a configurations x datasets matrix of deltas (report.datasets).
"""

from embft.errors import EmbftError
from embft.report.cli import main
from embft.report.loading import load_runs
from embft.report.rendering import format_table, plot, write_markdown
from embft.report.summary import TABLE_NUMBERS, StudyInfo, summarize, t_interval, used_sentence

__all__ = [
    "TABLE_NUMBERS",
    "EmbftError",
    "StudyInfo",
    "format_table",
    "load_runs",
    "main",
    "plot",
    "summarize",
    "t_interval",
    "used_sentence",
    "write_markdown",
]
