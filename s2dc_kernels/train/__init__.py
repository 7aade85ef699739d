"""S2DC pretraining on 3D NIfTI volumes: data and views (``data``), model and EMA teacher (``model``), the
four loss terms on the library's ops (``losses``) and the training loop with resumable checkpoints (``loop``).

Command line: ``s2dc-train`` or ``python -m s2dc_kernels.train`` (``--help``); in Python,
``train(parse_args([...]))`` runs the same thing and returns the run's summary.
"""

from .cli import build_parser, main, parse_args
from .loop import RunError, Trainer, train

__all__ = ["RunError", "Trainer", "build_parser", "main", "parse_args", "train"]
