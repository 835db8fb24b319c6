"""Tiny Hydra app driving the embft_optuna sweeper in tests."""

import math
import time
from typing import Any

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    trial = cfg.optuna.trial_number
    time.sleep(cfg.sleep_s)  # lets concurrent workers overlap in the shared-study tests
    if cfg.mode == "raise" or trial in cfg.raise_on_trials:
        raise RuntimeError(f"requested failure (trial {trial})")
    if cfg.mode == "nan" or trial in cfg.nan_on_trials:
        return math.nan
    value = -((cfg.x - 2) ** 2) - (cfg.y + 1) ** 2
    if cfg.multi_objective:
        return [value, abs(cfg.x)]
    return value


if __name__ == "__main__":
    main()
