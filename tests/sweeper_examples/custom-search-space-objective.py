"""A search space partly in Python: z is searched near x, and a new key +w is added."""

import hydra
from omegaconf import DictConfig
from optuna.trial import Trial


@hydra.main(version_base=None, config_path="custom-search-space", config_name="config")
def objective(cfg: DictConfig) -> float:
    return float(cfg.x) ** 2 + float(cfg.y) ** 2 + float(cfg.z) ** 2 + float(cfg.w)


def configure(cfg: DictConfig, trial: Trial) -> None:
    x = trial.params["x"]
    trial.suggest_float("z", x - cfg.max_z_difference_from_x, x + cfg.max_z_difference_from_x)
    trial.suggest_float("+w", 0.0, 1.0)  # `+w`: w is not in the config, the override adds it


if __name__ == "__main__":
    objective()
