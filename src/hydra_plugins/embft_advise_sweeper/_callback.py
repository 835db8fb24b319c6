"""experiment=advise's multirun callback: embft's SweepSummary, with the advise plan checked before it
creates anything (a bad arm, budget or dataset is one line and no run), and without its own registration
(the advise sweeper registers the recommended arm, not the sweep's single best run)."""

from __future__ import annotations

import copy
import logging
from typing import Any

from omegaconf import DictConfig, open_dict

from embft.errors import EmbftError
from embft.tracking.sweep import SweepSummary

log = logging.getLogger("embft")


class AdviseSummary(SweepSummary):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ._plan import _composer, cells, make_plan

        compose, options = _composer(config)
        try:
            for cell in cells([str(a) for a in config.hydra.overrides.task]):  # every cell checked before any runs
                make_plan(compose(cell), cell, compose=compose, options=options)
        except EmbftError as err:
            log.error("%s", err)
            raise SystemExit(1) from None
        super().on_multirun_start(config, **kwargs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        config = copy.deepcopy(config)
        with open_dict(config):
            config.tracking.registered_model_name = None  # registered by the sweeper: the recommended arm
        super().on_multirun_end(config, **kwargs)
