"""Every setting of megalign in one typed tree: the model shape (model.py), the training flags by section
(sections.py, with Megatron's flag names), the flag machinery that builds argparse, value checks and the docs
from those fields (flags.py), validation and derived values (training.py), the command line and YAML
(loading.py), the learning-rate schedule's settings (lr_settings.py) and the value formats of
--data-path, --split and the parallel layout (data_paths.py, layout.py). It imports nothing of megalign but
megalign.errors and megalign.utils, so every component can take its typed section from here."""

from __future__ import annotations

from megalign.config.loading import add_arguments, build_parser, config_from_namespace, load_config, read_yaml
from megalign.config.training import TrainingConfig

__all__ = ["TrainingConfig", "add_arguments", "build_parser", "config_from_namespace", "load_config", "read_yaml"]
