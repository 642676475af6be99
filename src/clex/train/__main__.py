"""``python -m clex.train CONFIG [k=v ...]`` (the form accelerate and torchrun launch): :func:`clex.train.loop.main`."""

import sys

from .loop import cli

sys.exit(cli())
