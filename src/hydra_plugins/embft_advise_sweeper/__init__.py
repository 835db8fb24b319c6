"""The ``embft_advise`` sweeper (``experiment=advise``): per arm an Optuna search of its own settings on
validation (through the ``embft_optuna`` sweeper), the chosen settings confirmed over training seeds in one
batch, a recommendation report, the recommended arm's model registered as ``<name>@champion``."""
