"""Cluster access options shared by the commands that talk to a store cluster."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tmdht.config import parse_address
from tmdht.errors import ConfigError, UsageError
from tmdht.net.credentials import CLUSTER_KEY_ENV, ClusterAccess, ClusterCredentials

F = TypeVar("F", bound=Callable[..., Any])


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


def cluster_credentials(cluster_key_file: Path | None, insecure_open: bool) -> ClusterCredentials:
    """The keys the options name (UsageError if there is none or it cannot be read)."""
    try:
        return ClusterCredentials.load(
            key_file=cluster_key_file,
            env=os.environ,
            insecure_open=insecure_open,
            how=f"--cluster-key-file FILE or ${CLUSTER_KEY_ENV} (or --insecure-open)",
            key_file_label="--cluster-key-file",
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def cluster_access(
    seeds: tuple[str, ...], cluster_key_file: Path | None, insecure_open: bool
) -> ClusterAccess:
    """The cluster the options name (UsageError if incomplete)."""
    if not seeds:
        raise UsageError("say which cluster: --seed HOST:PORT (a node's Kademlia port)")
    try:
        addresses = tuple(parse_address(s) for s in seeds)
    except ConfigError as exc:
        raise UsageError(f"--seed: {exc}") from None
    return ClusterAccess(addresses, cluster_credentials(cluster_key_file, insecure_open))
