"""The ``ltsam train`` command: timm's pieces around a loop that steps plain and SAM-family optimizers."""

from ltsam.train.main import main

__all__ = ["main"]
