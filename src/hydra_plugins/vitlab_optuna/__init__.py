"""vitlab's Optuna sweeper (``hydra/sweeper=vitlab_optuna``), found by Hydra in the
``hydra_plugins`` namespace package: see ``optuna_sweeper``."""
