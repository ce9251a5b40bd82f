"""Node configuration: file, environment and flags merge into one validated object."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmdht.config import NodeConfig, parse_address
from tmdht.errors import ConfigError
from tmdht.placement import VIRTUAL_IDS, FailureDomain

TOML = """
[node]
data_dir = "/var/lib/tmdht/a"
seeds = ["10.0.0.1:7400", "[::1]:7500"]
capacity = "2GiB"
replicas = 2
"""


def test_sources_merge_later_wins() -> None:
    env = {"TMDHT_NODE_REPLICAS": "4", "TMDHT_NODE_LOG_FORMAT": "text", "OTHER": "x"}
    cfg = NodeConfig.from_sources(toml_text=TOML, env=env, flags={"data_port": 0, "host": None})
    assert cfg.data_dir == Path("/var/lib/tmdht/a")
    assert cfg.seeds == (("10.0.0.1", 7400), ("::1", 7500))
    assert cfg.capacity == 2 << 30
    assert cfg.replicas == 4  # env beats file
    assert cfg.data_port == 0  # flag
    assert cfg.host == "127.0.0.1"  # a None flag does not override
    assert cfg.log_format == "text"
    assert cfg.to_dict()["seeds"] == ["10.0.0.1:7400", "::1:7500"]


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("data_dir = 1\nreplicas = 0", {}, "replicas"),
        ('data_dir = "x"\nbogus = 1', {}, "unknown setting"),
        ('data_dir = "x"', {"TMDHT_NODE_CAPACITY": "lots"}, "capacity"),
        ('data_dir = "x"', {"TMDHT_NODE_SEEDS": "nohost"}, "host:port"),
        ('data_dir = "x"\nmax_datagram = 100', {}, "max_datagram"),
        ('data_dir = "x"\nlog_format = "xml"', {}, "log_format"),
        ("data_dir = ", {}, "config"),
        ("replicas = 3", {}, "data_dir is required"),
        ('data_dir = "x"\nkademlia_port = 70000', {}, "out of range"),
        ('data_dir = "x"\nvirtual_ids = 0', {}, "virtual_ids"),
        ('data_dir = "x"', {"TMDHT_NODE_VIRTUAL_IDS": "257"}, "at most 256 virtual IDs"),
    ],
)
def test_bad_config_is_a_clear_error(toml: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_sources(toml_text=toml, env=env)


@settings(max_examples=200)
@given(st.text(max_size=60))
def test_any_address_text_parses_or_raises_config_error(text: str) -> None:
    try:
        host, port = parse_address(text)
    except ConfigError:
        return
    assert host and 0 < port < 65536


def test_rate_limit_settings() -> None:
    cfg = NodeConfig.from_sources(toml_text='data_dir = "x"')
    assert (cfg.rate_limit, cfg.rate_limit_burst) == (200_000.0, 20_000)
    env = {"TMDHT_NODE_RATE_LIMIT": "0", "TMDHT_NODE_RATE_LIMIT_BURST": "5"}
    cfg = NodeConfig.from_sources(toml_text='data_dir = "x"', env=env)
    assert (cfg.rate_limit, cfg.rate_limit_burst) == (0.0, 5)
    for bad in ("rate_limit = -1", "rate_limit = inf", "rate_limit = nan", "rate_limit_burst = 0"):
        with pytest.raises(ConfigError, match="rate_limit"):
            NodeConfig.from_sources(toml_text=f'data_dir = "x"\n{bad}')


def test_every_setting_has_a_node_run_flag() -> None:
    import dataclasses

    from tmdht.cli.node import node_run

    flags = {p.name for p in node_run.params}
    settings_ = {f.name for f in dataclasses.fields(NodeConfig)}
    assert settings_ - flags == set()


@pytest.mark.parametrize(
    "line",
    [
        "capacity = 0.5", "max_datagram = [1]", "capacity = true", "capacity = 'inf'",
        "capacity = '1e400'", "replicas = inf", "kademlia_port = -inf", "rate_limit_burst = nan",
        "max_datagram = {a = 1}",
    ],
)  # fmt: skip
def test_odd_toml_values_are_config_errors(line: str) -> None:
    """Found by bench/fuzz.py: a TOML float or array where a size goes crashed the parser."""
    with pytest.raises(ConfigError):
        NodeConfig.from_sources(toml_text=f'data_dir = "x"\n{line}')


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["capacity", "max_datagram", "replicas", "virtual_ids", "kademlia_port",
                     "rate_limit",
                     "seeds", "host", "log_level", "insecure_open", "replication_rate"]),
    st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.booleans(), st.text(max_size=20),
              st.lists(st.integers(), max_size=3)),
)  # fmt: skip
def test_any_value_of_any_setting_parses_or_raises_config_error(name: str, value: object) -> None:
    with contextlib.suppress(ConfigError):
        NodeConfig.build({"data_dir": "x", name: value})


def test_failure_domain_labels_from_file_env_and_flags() -> None:
    toml = 'data_dir = "x"\nzone = "eu-1"\nrack = "r1"\n'
    env = {"TMDHT_NODE_RACK": "r2"}
    cfg = NodeConfig.from_sources(toml_text=toml, env=env, flags={"host_label": "m7"})
    assert cfg.failure_domain("ignored") == FailureDomain("eu-1", "r2", "m7")
    plain = NodeConfig.build({"data_dir": "x"})
    assert plain.failure_domain("box1") == FailureDomain("", "", "box1")  # default: the machine
    with pytest.raises(ConfigError, match="zone"):
        NodeConfig.build({"data_dir": "x", "zone": "z" * 65})
    with pytest.raises(ConfigError, match="rack"):
        NodeConfig.build({"data_dir": "x", "rack": "a\tb"})


def test_require_stamped_from_file_env_and_flags() -> None:
    assert NodeConfig.build({"data_dir": "x"}).require_stamped is False
    on = NodeConfig.from_sources(toml_text='data_dir = "x"\nrequire_stamped = true')
    assert on.require_stamped is True
    env = {"TMDHT_NODE_REQUIRE_STAMPED": "false"}
    assert NodeConfig.from_sources(toml_text='data_dir = "x"\nrequire_stamped = true',
                                   env=env).require_stamped is False
    assert NodeConfig.from_sources(toml_text='data_dir = "x"', env=env,
                                   flags={"require_stamped": True}).require_stamped is True
    with pytest.raises(ConfigError, match="require_stamped"):
        NodeConfig.from_sources(toml_text='data_dir = "x"\nrequire_stamped = "maybe"')


def test_virtual_ids_from_file_env_and_flags() -> None:
    assert NodeConfig.build({"data_dir": "x"}).virtual_ids == VIRTUAL_IDS
    toml = 'data_dir = "x"\nvirtual_ids = 8'
    assert NodeConfig.from_sources(toml_text=toml).virtual_ids == 8
    env = {"TMDHT_NODE_VIRTUAL_IDS": "1"}
    assert NodeConfig.from_sources(toml_text=toml, env=env).virtual_ids == 1
    assert NodeConfig.from_sources(toml_text=toml, env=env,
                                   flags={"virtual_ids": 32}).virtual_ids == 32
