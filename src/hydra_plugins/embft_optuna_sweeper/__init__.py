"""Optuna (>=4) sweeper for Hydra, shipped with embft.

Select it with ``hydra/sweeper=embft_optuna`` (or ``override hydra/sweeper: embft_optuna``
in a defaults list). See :mod:`.config` for the options.
"""
