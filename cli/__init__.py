"""The ``tmdht`` command line: a thin layer from options to the library."""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """Console script entry point. ``tmdht qemu send`` with plain options runs without click
    (:mod:`tmdht.cli.fastpath`: it is QEMU's exec: command, and start-up counts); everything
    else, and anything the fast path does not recognise, goes through the click CLI."""
    import sys  # noqa: PLC0415

    from tmdht.cli.fastpath import run_fast  # noqa: PLC0415

    if run_fast(sys.argv[1:]):
        return
    from tmdht.cli.main import main as click_main  # noqa: PLC0415

    click_main()
