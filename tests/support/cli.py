"""Running the ``tmdht`` command as a user would: a real process."""

from __future__ import annotations

import subprocess
import sys


def tmdht(*args: object, expect: int = 0, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``tmdht ARGS`` with this interpreter; assert its exit code."""
    proc = subprocess.run(
        [sys.executable, "-m", "tmdht.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == expect, proc.stderr
    return proc
