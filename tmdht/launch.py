"""How to start the ``tmdht`` command as a child process (the argument list; running it is the
caller's business).

``python -m tmdht.cli`` puts the current folder first on ``sys.path``: started from a folder that
holds a folder named ``tmdht`` (a clone of this repository, say), the child imports that folder as
a namespace package instead of the installed ``tmdht`` and dies with ``ImportError: cannot import
name ... from 'tmdht' (unknown location)``. ``-P`` (Python 3.11+, the same as
``PYTHONSAFEPATH=1``) leaves the current folder off ``sys.path``, so what the child imports does
not depend on where the parent was started.
"""

from __future__ import annotations

import sys

__all__ = ["tmdht_argv"]


def tmdht_argv(*args: object, python: str | None = None) -> list[str]:
    """``[python, "-m", "tmdht.cli", *args]``: the ``tmdht`` command run by ``python``
    (default: this interpreter), immune to the current folder's contents."""
    return [python or sys.executable, "-P", "-m", "tmdht.cli", *map(str, args)]
