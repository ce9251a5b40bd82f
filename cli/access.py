"""Cluster access options shared by the commands that talk to a store cluster."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tmdht.auth import parse_cluster_keys
from tmdht.config import parse_address
from tmdht.errors import ConfigError, UsageError

F = TypeVar("F", bound=Callable[..., Any])
CLUSTER_KEY_ENV = "TMDHT_CLUSTER_KEY"


def cluster_options(func: F) -> F:
    """--seed (repeatable), --cluster-key-file, --insecure-open."""
    func = click.option("--insecure-open", is_flag=True, help="The cluster runs without a key.")(
        func
    )
    func = click.option(
        "--cluster-key-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help=f"Cluster key file (or ${CLUSTER_KEY_ENV}).",
    )(func)
    func = click.option(
        "--seed",
        "seeds",
        multiple=True,
        help="host:port of a store node's Kademlia port (repeatable).",
    )(func)
    return func


def store_kwargs(
    seeds: tuple[str, ...], cluster_key_file: Path | None, insecure_open: bool
) -> dict[str, Any]:
    """Arguments for TemplateStoreClient from the options (UsageError if incomplete)."""
    if not seeds:
        raise UsageError("say which cluster: --seed HOST:PORT (a node's Kademlia port)")
    try:
        addresses = [parse_address(s) for s in seeds]
    except ConfigError as exc:
        raise UsageError(f"--seed: {exc}") from None
    key: str | None = None
    if cluster_key_file is not None:
        try:
            key = cluster_key_file.read_text()
        except OSError as exc:
            raise UsageError(f"--cluster-key-file {cluster_key_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(
                f"--cluster-key-file {cluster_key_file}: not a key file (binary content)"
            ) from None
        source = f"--cluster-key-file {cluster_key_file}"
    elif os.environ.get(CLUSTER_KEY_ENV):
        key = os.environ[CLUSTER_KEY_ENV]
        source = f"${CLUSTER_KEY_ENV}"
    elif not insecure_open:
        raise UsageError(
            f"no cluster key: --cluster-key-file FILE or ${CLUSTER_KEY_ENV} (or --insecure-open)"
        )
    if key is not None:
        try:
            parse_cluster_keys(key)  # checked here, so the message can name where it came from
        except ConfigError as exc:
            raise UsageError(f"{source}: {exc}") from None
        key = key.strip()
    return {"seeds": addresses, "cluster_key": key, "open_mode": key is None}
