"""Configuration of a store node: one frozen object built once from a file, the environment
and command-line flags (later sources win). Pure: the caller reads the file and passes its text.

TOML keys are the field names, under a ``[node]`` table (or at the top level); environment
variables are ``TMDHT_NODE_<FIELD>`` in upper case. Seeds are ``host:port`` strings (a list in
TOML, comma-separated in the environment). Sizes accept ``KiB``/``MiB``/``GiB`` suffixes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tmdht.domains import MAX_VIRTUAL_IDS, VIRTUAL_IDS, FailureDomain
from tmdht.errors import ConfigError, UsageError
from tmdht.pages import PAGE_SIZE

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "ENV_PREFIX",
    "NodeConfig",
    "config_dict",
    "merge_sources",
    "parse_address",
    "parse_size",
    "parse_values",
]

ENV_PREFIX: Final = "TMDHT_NODE_"
MIN_DATAGRAM: Final = PAGE_SIZE + 512
MAX_DATAGRAM: Final = 65507


def parse_size(text: str | int) -> int:
    """'256MiB', '1G', 4096 -> bytes."""
    if isinstance(text, bool) or not isinstance(text, int | str):
        # TOML hands over floats, booleans, arrays and tables as they are (found by fuzzing).
        raise ConfigError(f"{text!r} is not a size: write a whole number or e.g. '256MiB'")
    if isinstance(text, int):
        value = text
    else:
        units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
        raw = text.strip().lower().removesuffix("b").removesuffix("i")
        number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "")
        try:
            value = int(float(number) * units[unit])
        except (ValueError, OverflowError):  # e.g. 'nan', '1e400'
            raise ConfigError(f"{text!r} is not a size (e.g. 256MiB)") from None
    if value <= 0:
        raise ConfigError(f"{text!r}: a size must be positive")
    return value


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' -> (host, port); IPv6 as '[::1]:port'."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ConfigError(f"{text!r} is not host:port")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{text!r}: port is not a number") from None
    if not 0 < number < 65536:
        raise ConfigError(f"{text!r}: port out of range")
    return host, number


def _port(value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{value!r} is not a port number") from None
    if not 0 <= port < 65536:
        raise ConfigError(f"port {port} out of range")
    return port


def _positive_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{value!r} is not a number") from None
    if not number > 0:
        raise ConfigError(f"{value!r} must be positive")
    return number


def _non_negative_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{value!r} is not a number") from None
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"{value!r} must be a finite number >= 0")
    return number


def _positive_int(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise ConfigError(f"{value!r} must be at least 1")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{value!r} is not true or false")


def _seeds(value: Any) -> tuple[tuple[str, int], ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError("seeds must be a list of host:port")
    return tuple(parse_address(str(s)) for s in items if str(s).strip())


def _ip_literal(value: Any) -> str:
    text = str(value).strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{value!r} is not an IP address (peers cannot use a name)") from None
    return text


def _optional_ip_literal(value: Any) -> str | None:
    return None if value in (None, "") else _ip_literal(value)


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).lower()
        if text not in options:
            raise ConfigError(f"{value!r} is not one of {', '.join(options)}")
        return text

    return parse


def _virtual_ids(value: Any) -> int:
    count = _positive_int(value)
    if count > MAX_VIRTUAL_IDS:
        raise ConfigError(f"at most {MAX_VIRTUAL_IDS} virtual IDs per node, got {count}")
    return count


def _label(value: Any) -> str:
    """A failure-domain label (zone, rack or host): short printable text."""
    if not isinstance(value, str):
        raise ConfigError(f"{value!r} is not a label (text)")
    try:
        FailureDomain(zone=value)
    except UsageError as exc:
        raise ConfigError(str(exc)) from None
    return value


def _path(value: Any) -> Path:
    return Path(str(value)).expanduser()


def _optional_path(value: Any) -> Path | None:
    return None if value in (None, "") else _path(value)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a store node needs to run."""

    data_dir: Path
    """Where the node keeps its identity (node.json) and its page store."""
    host: str = "127.0.0.1"
    """Address to bind (all three ports)."""
    advertise_host: str | None = None
    """Address other nodes and clients should use (default: ``host``)."""
    kademlia_port: int = 7400
    """UDP port of the Kademlia overlay (0: any free port)."""
    data_port: int = 7401
    """UDP port of the page data plane (0: any free port)."""
    metrics_port: int = 7402
    """HTTP port for /metrics and /healthz, /readyz (0: any free port)."""
    seeds: tuple[tuple[str, int], ...] = ()
    """Kademlia addresses of existing nodes to join through."""
    replicas: int = 3
    """R: how many nodes hold each page."""
    virtual_ids: int = VIRTUAL_IDS
    """V: placement tokens per node (:mod:`tmdht.placement`): more spread the pages more evenly
    over the nodes. Cluster-wide: every node and client must use the same V (changing it moves
    most pages, as the replication job then finds them misplaced); 1 places by node ID alone."""
    capacity: int = 10 << 30
    """Bytes of pages this node may store."""
    wave_capacity: int = 1 << 30
    """Bytes of wave pages (migration waves, :mod:`tmdht.wave`) this node may keep, apart from
    ``capacity``: wave pages never take room from templates (0: keep none)."""
    wave_max_ttl: float = 24 * 3600.0
    """Longest time-to-live, in seconds, a wave page is kept (a receiver's shorter one wins)."""
    max_datagram: int = 32768
    """Largest data-plane datagram sent or accepted."""
    cluster_key_file: Path | None = None
    """File holding the cluster key: 64 hex characters, or several ``id:hex`` lines during a key
    rotation (the first line's key signs, every listed key is accepted; see SECURITY.md).
    $TMDHT_CLUSTER_KEY works too."""
    insecure_open: bool = False
    """Run without a cluster key (local development only)."""
    require_stamped: bool = False
    """Refuse the overlay's unstamped (version 1, no replay protection) datagrams: set it once
    every node and client of the cluster sends version 2 (SECURITY.md, "Replay protection on
    the overlay")."""
    rpc_timeout: float = 1.0
    """Seconds before a Kademlia RPC counts as failed."""
    refresh_interval: float = 30.0
    """Seconds between ring crawls."""
    replication_interval: float = 60.0
    """Seconds between anti-entropy sweeps (membership changes and client PUTs trigger work at
    once)."""
    anti_entropy: str = "range"
    """How a sweep checks replicas: ``range`` compares bucket hashes and asks about pages only
    where they differ (:mod:`tmdht.rangehash`); ``full`` asks every replica about every page
    (the earlier sweep, kept for comparison)."""
    replication_rate: int = 20000
    """Pages per second the replication job may move."""
    rate_limit: float = 200_000.0
    """Data-plane datagrams per second one source IP may send; excess is dropped (0: no limit)."""
    rate_limit_burst: int = 20_000
    """Data-plane datagrams one source IP may send back to back (the token bucket's size)."""
    surplus_grace: float = 600.0
    """Seconds a page this node no longer owes is kept before it is dropped."""
    commit_delay: float = 0.0
    """Seconds a group commit of PUTs may wait for more PUTs while they stream in (0, the
    default: never; at most 1). Acknowledgements still follow the fsync
    (:mod:`tmdht.node.groupcommit`, which says why it is off by default)."""
    log_format: str = "json"
    """``json`` (one object a line) or ``text``."""
    log_level: str = "info"
    """debug, info, warning or error."""
    status_file: Path | None = None
    """If set, the node writes its bound addresses here as JSON once it is ready."""
    zone: str = ""
    """Failure domain: the zone (room, availability zone) this node runs in. Replicas of a page
    go to distinct zones, then racks, then hosts, whenever the ring has enough of them."""
    rack: str = ""
    """Failure domain: the rack within the zone."""
    host_label: str = ""
    """Failure domain: the machine (default: its host name; node processes on one machine share
    it)."""

    @property
    def public_host(self) -> str:
        """The address peers use."""
        return self.advertise_host or self.host

    def failure_domain(self, hostname: str) -> FailureDomain:
        """This node's failure domain; ``hostname`` (the machine's name) if no host label."""
        return FailureDomain(self.zone, self.rack, self.host_label or hostname)

    @classmethod
    def from_sources(
        cls,
        *,
        toml_text: str | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, object] | None = None,
        source: str = "config",
    ) -> NodeConfig:
        """Merge file, environment and flags (each later source wins) and validate."""
        return cls.build(merge_sources(
            "node", ENV_PREFIX, _PARSERS, toml_text=toml_text, env=env, flags=flags,
            source=source))

    @classmethod
    def build(cls, values: Mapping[str, object]) -> NodeConfig:
        """Validate raw values (strings from env, TOML values, flags) into a config."""
        parsed = parse_values(values, _PARSERS)
        if "data_dir" not in parsed:
            raise ConfigError(
                "data_dir is required (--data-dir DIR, data_dir under [node] in the config file, "
                "or $TMDHT_NODE_DATA_DIR)"
            )
        config = cls(**parsed)
        if not MIN_DATAGRAM <= config.max_datagram <= MAX_DATAGRAM:
            raise ConfigError(f"max_datagram must be between {MIN_DATAGRAM} and {MAX_DATAGRAM}")
        if config.commit_delay > 1:
            raise ConfigError(f"commit_delay must be at most 1 second, got {config.commit_delay}")
        return config

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly view (for logs and status)."""
        return config_dict(self)


def merge_sources(table_name: str, env_prefix: str, parsers: Mapping[str, object], *,
                  toml_text: str | None, env: Mapping[str, str] | None,
                  flags: Mapping[str, object] | None, source: str) -> dict[str, object]:
    """Raw values of a service's config from its TOML file (keys under ``[table_name]`` or at
    the top level), ``<env_prefix><FIELD>`` variables and flags (``None``: not given), later
    sources winning. Unknown keys are refused (ConfigError naming where they came from)."""

    def known(table: Mapping[str, object], where: str) -> dict[str, object]:
        unknown = sorted(set(table) - set(parsers))
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        return dict(table)

    values: dict[str, object] = {}
    if toml_text is not None:
        try:
            doc = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        table = doc.get(table_name, doc)
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{table_name}] must be a table")
        values.update(known(table, source))
    for key, value in (env or {}).items():
        if key.startswith(env_prefix) and key != f"{env_prefix}CONFIG":
            values.update(known({key[len(env_prefix) :].lower(): value}, f"${key}"))
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return values


def parse_values(values: Mapping[str, object], parsers: Mapping[str, Callable[[Any], Any]]
                 ) -> dict[str, Any]:
    """Each raw value through its field's parser (ConfigError names the field)."""
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        parser = parsers.get(name)
        if parser is None:
            raise ConfigError(f"unknown setting {name!r}")
        try:
            parsed[name] = parser(value)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return parsed


def config_dict(config: DataclassInstance) -> dict[str, object]:
    """A config dataclass as JSON-friendly values (paths as strings, seeds as host:port)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif f.name == "seeds":
            value = [f"{h}:{p}" for h, p in value]
        out[f.name] = value
    return out


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "data_dir": _path,
    "host": _ip_literal,
    "advertise_host": _optional_ip_literal,
    "kademlia_port": _port,
    "data_port": _port,
    "metrics_port": _port,
    "seeds": _seeds,
    "replicas": _positive_int,
    "virtual_ids": _virtual_ids,
    "capacity": parse_size,
    "wave_capacity": lambda v: 0 if v in (0, "0") else parse_size(v),
    "wave_max_ttl": _positive_float,
    "max_datagram": parse_size,
    "cluster_key_file": _optional_path,
    "insecure_open": _bool,
    "require_stamped": _bool,
    "rpc_timeout": _positive_float,
    "refresh_interval": _positive_float,
    "replication_interval": _positive_float,
    "replication_rate": _positive_int,
    "anti_entropy": _choice("range", "full"),
    "rate_limit": _non_negative_float,
    "rate_limit_burst": _positive_int,
    "surplus_grace": _positive_float,
    "commit_delay": _non_negative_float,
    "log_format": _choice("json", "text"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "status_file": _optional_path,
    "zone": _label,
    "rack": _label,
    "host_label": _label,
}
