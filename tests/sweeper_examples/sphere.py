"""x² + y², to be minimized (0 at x = y = 0); `error=true` makes every job raise."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="conf", config_name="config")
def sphere(cfg: DictConfig) -> float:
    if cfg.get("error", False):
        raise RuntimeError("cfg.error is True")
    return float(cfg.x) ** 2 + float(cfg.y) ** 2


if __name__ == "__main__":
    sphere()
