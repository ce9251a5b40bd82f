"""Cluster credentials and access: the keys cluster traffic is authenticated with, and where a
cluster is reached.

One type reads keys for everyone -- a node (``cluster_key_file`` or ``$TMDHT_CLUSTER_KEY``), the
client library, the CLI (``--cluster-key-file``): :class:`ClusterCredentials`. It holds the key
a process sends with and every key it accepts (during a rotation, see
:func:`tmdht.auth.parse_cluster_keys`), and makes the two authenticators that use them: the data
plane's (:meth:`~ClusterCredentials.authenticator`) and the overlay's keys
(:attr:`~ClusterCredentials.overlay_key`, :attr:`~ClusterCredentials.accepted_overlay_keys`).
:class:`ClusterAccess` adds the seeds: everything a client needs to reach a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tmdht.auth import Authenticator, ClusterKey, keyring_from, load_key, parse_cluster_keys
from tmdht.errors import ConfigError, UsageError
from tmdht.net.address import Address

__all__ = ["CLUSTER_KEY_ENV", "ClusterAccess", "ClusterCredentials", "read_key_file"]

CLUSTER_KEY_ENV: Final = "TMDHT_CLUSTER_KEY"
"""The environment variable a key file's text may come from instead of a file."""


def read_key_file(path: Path, source: str) -> str:
    """A key file's text; ConfigError starting ``{source}:`` if it cannot be read or is binary
    (never the key material in the message)."""
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a key file (binary content)") from None


@dataclass(frozen=True, slots=True)
class ClusterCredentials:
    """The cluster keys of one process: ``keys[0]`` sends, all are accepted; none: open mode
    (unauthenticated, development only)."""

    keys: tuple[ClusterKey, ...] = ()

    @classmethod
    def open_mode(cls) -> ClusterCredentials:
        """No key: datagrams are not authenticated (a cluster started with insecure_open)."""
        return cls(())

    @classmethod
    def from_text(cls, text: str, source: str = "cluster key") -> ClusterCredentials:
        """A key file's text: one key of 64 hex digits, or ``id:hex`` lines during a rotation.
        Raises ConfigError naming ``source`` (never the key material)."""
        try:
            return cls(tuple(parse_cluster_keys(text)))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: Path, label: str = "cluster key file") -> ClusterCredentials:
        """The keys in a key file; ConfigError if it cannot be read or parsed, its message
        starting ``{label} {path}:``."""
        source = f"{label} {path}"
        return cls.from_text(read_key_file(path, source), source)

    @classmethod
    def from_key(cls, key: bytes | str) -> ClusterCredentials:
        """A raw 32-byte key, or a key file's text (str)."""
        if isinstance(key, str):
            return cls.from_text(key)
        return cls((ClusterKey(1, load_key(key)),))

    @classmethod
    def load(
        cls,
        *,
        key_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        insecure_open: bool = False,
        how: str = f"set cluster_key_file or ${CLUSTER_KEY_ENV}",
        key_file_label: str = "cluster key file",
    ) -> ClusterCredentials:
        """The keys from ``key_file``, else from ``$TMDHT_CLUSTER_KEY`` in ``env``, else open
        mode if ``insecure_open``. Without a key and open mode, ConfigError: ``no cluster key:``
        followed by ``how`` (how the caller's user gives one); errors about the file name it
        as ``key_file_label`` (the caller's word for it: ``--cluster-key-file``)."""
        if key_file is not None:
            return cls.from_file(key_file, key_file_label)
        if env and env.get(CLUSTER_KEY_ENV):
            return cls.from_text(env[CLUSTER_KEY_ENV], f"${CLUSTER_KEY_ENV}")
        if insecure_open:
            return cls.open_mode()
        raise ConfigError(f"no cluster key: {how}")

    @property
    def is_open(self) -> bool:
        """True without a key (open mode)."""
        return not self.keys

    def authenticator(self) -> Authenticator:
        """A new data-plane authenticator (one per socket: it holds a replay window)."""
        if not self.keys:
            return Authenticator.open_mode()
        return Authenticator.keyed(keyring_from(list(self.keys)))

    @property
    def overlay_key(self) -> bytes | None:
        """The secret the overlay tags its datagrams with (None: open)."""
        return self.keys[0].secret if self.keys else None

    @property
    def accepted_overlay_keys(self) -> tuple[bytes, ...]:
        """The other secrets whose overlay tags are accepted (during a rotation)."""
        return tuple(k.secret for k in self.keys[1:])

    def reloaded(self, key_file: Path | None) -> ClusterCredentials:
        """The keys re-read from ``key_file`` for a rotation step without a restart (SIGHUP,
        ``systemctl reload``). ConfigError saying why not -- the keys did not come from a file,
        the process runs open, or the file cannot be read or parsed -- and the caller keeps
        these keys."""
        if key_file is None:
            raise ConfigError("the keys did not come from a file (cluster_key_file)")
        if self.is_open:
            raise ConfigError("running open (insecure_open): restart with a key to use one")
        return self.from_file(key_file)

    def describe(self) -> str:
        """For logs: the key ids (never the keys), or that the cluster runs open."""
        if not self.keys:
            return "open (unauthenticated)"
        ids = ", ".join(str(k.key_id) for k in self.keys)
        return f"key id {self.keys[0].key_id} (accepting {ids})"


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """Everything a client needs to reach a cluster: seeds and credentials."""

    seeds: tuple[Address, ...]
    """(host, port) of store nodes' Kademlia sockets; hostnames are resolved."""
    credentials: ClusterCredentials

    def __post_init__(self) -> None:
        """Refuse an access without a seed (UsageError); accept any sequence of pairs."""
        object.__setattr__(self, "seeds", tuple((str(h), int(p)) for h, p in self.seeds))
        if not self.seeds:
            raise UsageError("at least one seed (a node's Kademlia host:port) is needed")

    @classmethod
    def of(cls, seeds: Sequence[Address], key: bytes | str | None = None) -> ClusterAccess:
        """Seeds and a key (raw bytes or a key file's text; None: open mode)."""
        credentials = (
            ClusterCredentials.open_mode() if key is None else ClusterCredentials.from_key(key)
        )
        return cls(tuple(seeds), credentials)
