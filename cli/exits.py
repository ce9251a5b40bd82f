"""The CLI's error contract in one place: which error ends a command with which exit code, and
its one-line message (README "Using it"; tests/cli/test_contract.py holds every subcommand to it).

No click here: the ``qemu send`` fast path (:mod:`tmdht.cli.fastpath`) reports its errors
without importing click, by the same table as the click commands (:mod:`tmdht.cli.main`).
"""

from __future__ import annotations

from tmdht.errors import CatalogMismatchError, ConfigError, DecodeError, TmdhtError, UsageError

__all__ = ["EXIT_CODES", "EXIT_FAILED", "EXIT_UNUSABLE_INPUT", "exit_code_for", "one_line"]

EXIT_FAILED = 1
"""The input was usable and the operation failed: no store node answered (nothing there, or a
different cluster key), pages unavailable, a migration failed, a node could not start, a disk
filled up. Trying again later (or elsewhere) may succeed."""
EXIT_UNUSABLE_INPUT = 2
"""What the command was given cannot be used, and trying again will not help: a bad option or
argument, a missing or unreadable file, an empty one, a file of the wrong kind (random bytes
included), a damaged or truncated one, a malformed key, a stream and a catalog that do not belong
together, images that hold none of the templates asked for. Click's own usage errors use 2 too."""

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageError, EXIT_UNUSABLE_INPUT),
    (ConfigError, EXIT_UNUSABLE_INPUT),
    (DecodeError, EXIT_UNUSABLE_INPUT),  # decoders of files: wrong kind, truncated, damaged
    (CatalogMismatchError, EXIT_UNUSABLE_INPUT),
    (FileNotFoundError, EXIT_UNUSABLE_INPUT),
    (IsADirectoryError, EXIT_UNUSABLE_INPUT),
    (NotADirectoryError, EXIT_UNUSABLE_INPUT),
    (PermissionError, EXIT_UNUSABLE_INPUT),
    (TmdhtError, EXIT_FAILED),
    (OSError, EXIT_FAILED),
)
"""The one mapping from errors to exit codes: the first entry the error is an instance of wins.
Errors from the network side never reach it as DecodeError (the proxies wrap theirs in
MigrationFailed, the client drops bad datagrams)."""


def exit_code_for(exc: BaseException) -> int:
    """The exit code of a command that failed with ``exc`` (see :data:`EXIT_CODES`)."""
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_FAILED


def one_line(exc: BaseException) -> str:
    """The error as one line: OSErrors as ``FILE: reason``, newlines folded."""
    if isinstance(exc, OSError) and not isinstance(exc, TmdhtError):
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
