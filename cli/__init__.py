"""The ``tmdht`` command line: a thin layer from options to the library."""

from tmdht.cli.main import main

__all__ = ["main"]
