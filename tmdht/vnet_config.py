"""Configuration of a vnet agent (``tmdht vnet run``): one frozen object built once from a file,
the environment and command-line flags, later sources winning, like the store node's
(:mod:`tmdht.config`). Pure: the caller reads the file and passes its text.

TOML keys are the field names, under a ``[vnet]`` table (or at the top level); environment
variables are ``TMDHT_VNET_<FIELD>``. Seeds are ``host:port`` of store nodes' Kademlia ports (a
list in TOML, comma-separated in the environment).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tmdht.config import (
    _bool,
    _choice,
    _optional_path,
    _path,
    _port,
    _positive_float,
    _positive_int,
    _seeds,
    config_dict,
    merge_sources,
    parse_size,
    parse_values,
)
from tmdht.errors import ConfigError
from tmdht.tunnel import MAX_SITE_BYTES

__all__ = ["ENV_PREFIX", "VnetConfig"]

ENV_PREFIX: Final = "TMDHT_VNET_"


def _site(value: Any) -> str:
    text = str(value).strip()
    if not text or len(text) > MAX_SITE_BYTES or not text.isascii() or not text.isprintable():
        raise ConfigError(f"{value!r}: a site is 1..{MAX_SITE_BYTES} printable ASCII characters")
    return text


@dataclass(frozen=True, slots=True)
class VnetConfig:
    """Everything a vnet agent needs to run."""

    data_dir: Path
    """Where the agent keeps its attached ports (``ports.json``) and its control socket."""
    seeds: tuple[tuple[str, int], ...] = ()
    """Kademlia addresses of store nodes: the MAC directory lives in their ring (required)."""
    host: str = "127.0.0.1"
    """Address to bind the tunnel socket and the metrics endpoint to."""
    advertise_host: str | None = None
    """Address other agents reach this one at (default: ``host``)."""
    tunnel_port: int = 7410
    """UDP port of the tunnel between agents (0: any free port)."""
    metrics_port: int = 7412
    """HTTP port of /metrics, /healthz, /readyz, /status (0: any free port)."""
    control_socket: Path | None = None
    """Unix socket ``tmdht vnet attach|detach|status`` talk to (default: data_dir/control.sock)."""
    site: str = "default"
    """This host's site (data center). Tunnels to agents of other sites are encrypted."""
    encrypt: str = "wan"
    """``wan`` (encrypt between sites), ``always`` or ``never`` (authenticate only)."""
    cluster_key_file: Path | None = None
    """The store cluster's key file (or $TMDHT_CLUSTER_KEY): it authenticates the directory
    requests, and keys derived from it authenticate and encrypt the tunnels."""
    insecure_open: bool = False
    """Run without a key (local development only): nothing authenticated or encrypted."""
    replicas: int = 3
    """R: store nodes holding each directory record (use the cluster's value)."""
    lease: float = 30.0
    """Seconds a directory record lives unless renewed (renewed every lease / 3)."""
    members_interval: float = 5.0
    """Seconds between fetches of the member lists of the agent's networks."""
    hold_frames: int = 8192
    """Frames held per port at most (while its VM is paused or migrating)."""
    hold_bytes: int = 16 << 20
    """Bytes held per port at most."""
    hold_timeout: float = 120.0
    """Held frames older than this are dropped."""
    handover_rto: float = 0.03
    """First retransmission timeout of handed-over frames."""
    fence_timeout: float = 0.25
    """Longest wait of a frame for the frames that went to a VM's old location before it."""
    gap_timeout: float = 3.0
    """A handed-over frame lost for good is skipped after this."""
    log_format: str = "json"
    """``json`` or ``text``."""
    log_level: str = "info"
    """debug, info, warning or error."""
    status_file: Path | None = None
    """If set, the agent writes its bound addresses here as JSON once it is ready."""

    @property
    def public_host(self) -> str:
        """The address other agents use."""
        return self.advertise_host or self.host

    @property
    def control_path(self) -> Path:
        """The control socket's path."""
        return self.control_socket or self.data_dir / "control.sock"

    @classmethod
    def from_sources(cls, *, toml_text: str | None = None, env: Mapping[str, str] | None = None,
                     flags: Mapping[str, Any] | None = None,
                     source: str = "config") -> VnetConfig:
        """Merge file, environment and flags (each later source wins) and validate."""
        return cls.build(merge_sources("vnet", ENV_PREFIX, _PARSERS, toml_text=toml_text,
                                       env=env, flags=flags, source=source))

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> VnetConfig:
        """Validate raw values (strings from env, TOML values, flags) into a config."""
        parsed = parse_values(values, _PARSERS)
        if "data_dir" not in parsed:
            raise ConfigError("data_dir is required (--data-dir DIR, data_dir under [vnet] in the "
                              "config file, or $TMDHT_VNET_DATA_DIR)")
        config = cls(**parsed)
        if not config.seeds:
            raise ConfigError("seeds are required (--seed HOST:PORT of a store node, seeds under "
                              "[vnet], or $TMDHT_VNET_SEEDS): the MAC directory lives in the "
                              "store cluster")
        if config.lease < 3 * 0.1:
            raise ConfigError("lease must be at least 0.3 s")
        return config

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (for logs and status)."""
        return config_dict(self)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "data_dir": _path,
    "seeds": _seeds,
    "host": str,
    "advertise_host": lambda v: None if v in (None, "") else str(v),
    "tunnel_port": _port,
    "metrics_port": _port,
    "control_socket": _optional_path,
    "site": _site,
    "encrypt": _choice("wan", "always", "never"),
    "cluster_key_file": _optional_path,
    "insecure_open": _bool,
    "replicas": _positive_int,
    "lease": _positive_float,
    "members_interval": _positive_float,
    "hold_frames": _positive_int,
    "hold_bytes": parse_size,
    "hold_timeout": _positive_float,
    "handover_rto": _positive_float,
    "fence_timeout": _positive_float,
    "gap_timeout": _positive_float,
    "log_format": _choice("json", "text"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "status_file": _optional_path,
}
