"""``tmdht qemu send`` without click: the sender is QEMU's ``exec:`` migration command, and
QEMU's stream waits for it to start reading. click and rich alone took longer to import than the
sender's whole start-up budget (100 ms to the first forwarded byte).

This is an optimisation, not a second CLI: it takes the command only when every argument is one
it knows, in a form click would read the same way (``--opt value``, ``--opt=value``), its values
parse, no ``TMDHT_QEMU_SEND_*`` variable is set, and nothing asks for rich or prometheus
(``--progress``, ``--metrics-port``) or for help. Anything else returns False and the click CLI
handles it, errors and help included. A test holds the two paths to the same configuration and
the same error contract (one ``Error:`` line on stderr; exit 2 for unusable input, 1 for a failed
operation).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["parse_send", "run_fast"]

_ENV_PREFIX = "TMDHT_QEMU_SEND_"
_VALUED = {"--catalog", "--to", "--backref-window", "--flow-window", "--connect-timeout",
           "--done-timeout", "--report", "--log-level", "--tls-creds", "--tls-hostname",
           "--tls-authz"}
_FLAGS = {"--compress", "--insecure-plaintext"}
_MAX_BACKREF_WINDOW = 1 << 18


def parse_send(argv: list[str]) -> tuple[Any, Path | None, str] | None:
    """(SenderConfig, report path, log level) if ``argv`` is ``qemu send`` with options the fast
    path takes as they are; None to let click handle it."""
    if argv[:2] != ["qemu", "send"] or any(k.startswith(_ENV_PREFIX) for k in os.environ):
        return None
    values: dict[str, str] = {}
    flags: set[str] = set()
    args = argv[2:]
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        if name in _VALUED and name not in values:
            if eq:
                values[name] = inline
            elif i + 1 < len(args):
                i += 1
                values[name] = args[i]
            else:
                return None
        elif arg in _FLAGS and not eq:
            flags.add(arg)
        else:
            return None  # unknown, repeated, --help, --progress, --metrics-port, positional
        i += 1
    from tmdht.errors import TmdhtError  # noqa: PLC0415

    try:
        return _config(values, flags)
    except (ValueError, OverflowError, TmdhtError):
        return None  # click says what is wrong


def _config(values: dict[str, str], flags: set[str]) -> tuple[Any, Path | None, str] | None:
    from tmdht.client.migration import SenderConfig  # noqa: PLC0415
    from tmdht.config import parse_address, parse_size  # noqa: PLC0415
    from tmdht.errors import ConfigError  # noqa: PLC0415

    if "--catalog" not in values or "--to" not in values:
        return None
    catalog = Path(values["--catalog"])
    if not catalog.is_file():
        return None  # click says what is wrong with it
    try:
        to = parse_address(values["--to"])
        flow_window = parse_size(values.get("--flow-window", "64MiB"))
    except ConfigError:
        return None
    backref_window = int(values.get("--backref-window", "32768"))
    if not 1 <= backref_window <= _MAX_BACKREF_WINDOW:
        return None
    tls = None
    if "--tls-creds" in values:
        from tmdht.client.tls import TlsConfig  # noqa: PLC0415

        tls = TlsConfig(Path(values["--tls-creds"]),
                        peer_subjects=(values["--tls-authz"],) if "--tls-authz" in values else (),
                        hostname=values.get("--tls-hostname"))
    elif "--tls-authz" in values or "--tls-hostname" in values:
        return None  # click refuses them without --tls-creds
    config = SenderConfig(
        catalog=catalog, to=to, compress="--compress" in flags, backref_window=backref_window,
        flow_window=flow_window,
        connect_timeout=float(values.get("--connect-timeout", "30")),
        done_timeout=float(values.get("--done-timeout", "120")),
        tls=tls, insecure_plaintext="--insecure-plaintext" in flags)
    report = Path(values["--report"]) if "--report" in values else None
    return config, report, values.get("--log-level", "warning")


def run_fast(argv: list[str]) -> bool:
    """Run ``qemu send`` here if :func:`parse_send` takes ``argv`` (exits on failure); False
    to let click handle the command line."""
    parsed = parse_send(argv)
    if parsed is None:
        return False
    config, report_path, log_level = parsed
    from tmdht.cli.exits import exit_code_for, one_line  # noqa: PLC0415
    from tmdht.cli.proxy import run_proxy, setup_logging  # noqa: PLC0415
    from tmdht.client.migration import run_sender  # noqa: PLC0415
    from tmdht.errors import TmdhtError  # noqa: PLC0415

    setup_logging(log_level)
    try:
        run_proxy("send", False, None, report_path,
                  lambda metrics, update: run_sender(config, metrics=metrics, on_progress=update),
                  run_in_loop=False)
    except (TmdhtError, OSError) as exc:  # the click commands' contract (cli/exits.py)
        _fail(one_line(exc), exit_code_for(exc))
    except KeyboardInterrupt:
        sys.stderr.write("\nAborted!\n")
        sys.exit(1)
    return True


def _fail(message: str, code: int) -> None:
    """What click prints for a ClickException (see TmdhtGroup.invoke), and its exit code."""
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)
