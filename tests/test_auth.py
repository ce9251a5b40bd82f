"""Tests for tmdht.auth: tags, key rotation, open mode, replay window."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmdht.auth import (
    AUTH_OVERHEAD,
    FLAG_OPEN,
    TAG_SIZE,
    AuthenticationError,
    Authenticator,
    ClockSkewError,
    ClusterKey,
    KeyRing,
    ReplayError,
    ReplayWindow,
    keyring_from,
    load_key,
    parse_cluster_keys,
)
from tmdht.errors import ConfigError, DecodeError, UsageError

NOW = 1_700_000_000.0
KEY_A = ClusterKey(1, bytes(range(32)))
KEY_B = ClusterKey(2, bytes(range(100, 132)))
PAYLOAD = b"header and body of some datagram"


def keyed(*keys: ClusterKey, window: float = 10.0, capacity: int = 1000) -> Authenticator:
    """An authenticator sending with the first key and also accepting the others."""
    ring = KeyRing(keys[0])
    for key in keys[1:]:
        ring.accept(key)
    return Authenticator.keyed(ring, window=window, capacity=capacity)


def counter_nonces() -> Authenticator:
    """A keyed sender with predictable nonces (1, 2, 3...)."""
    counter = itertools.count(1)
    return Authenticator(keyring=KeyRing(KEY_A), replay=None, nonce_source=lambda: next(counter))


# --- errors and keys -------------------------------------------------------------------------


def test_errors_are_decode_errors() -> None:
    assert issubclass(AuthenticationError, DecodeError)
    assert issubclass(ReplayError, DecodeError)
    assert issubclass(ClockSkewError, ReplayError)


def test_load_key_accepts_raw_and_hex() -> None:
    raw = bytes(range(32))
    assert load_key(raw) == raw
    assert load_key(raw.hex()) == raw
    assert load_key(raw.hex().upper() + "\n") == raw
    assert load_key(raw.hex().encode() + b"\n") == raw


@pytest.mark.parametrize(
    "material",
    [b"", b"short", bytes(31), bytes(33), "zz" * 32, "ab" * 31, "ab" * 33, b"\xff" * 64, "é" * 64],
)
def test_load_key_refuses_bad_material(material: str | bytes) -> None:
    with pytest.raises(ConfigError):
        load_key(material)


def test_cluster_key_validates_and_hides_secret() -> None:
    with pytest.raises(ConfigError):
        ClusterKey(0, bytes(32))
    with pytest.raises(ConfigError):
        ClusterKey(256, bytes(32))
    with pytest.raises(ConfigError):
        ClusterKey(1, bytes(31))
    assert bytes(range(32)).hex() not in repr(KEY_A)
    assert str(list(bytes(range(32)))) not in repr(KEY_A)


# --- sealing and opening ---------------------------------------------------------------------


def test_seal_open_roundtrip_keyed() -> None:
    sender, receiver = keyed(KEY_A), keyed(KEY_A)
    datagram = sender.seal(PAYLOAD, NOW)
    assert len(datagram) == len(PAYLOAD) + AUTH_OVERHEAD
    assert datagram.startswith(PAYLOAD)
    assert receiver.open(datagram, NOW + 0.5) == PAYLOAD


def test_seal_open_roundtrip_open_mode() -> None:
    sender, receiver = Authenticator.open_mode(), Authenticator.open_mode()
    datagram = sender.seal(PAYLOAD, NOW)
    assert datagram.endswith(bytes(TAG_SIZE))
    assert datagram[len(PAYLOAD)] == 0  # key id 0
    assert datagram[len(PAYLOAD) + 1] == FLAG_OPEN
    assert receiver.open(datagram, NOW) == PAYLOAD
    assert receiver.is_open


def test_nonces_differ_between_datagrams() -> None:
    sender = keyed(KEY_A)
    first, second = sender.seal(PAYLOAD, NOW), sender.seal(PAYLOAD, NOW)
    assert first != second


@settings(max_examples=300)
@given(st.data())
def test_any_tampered_byte_is_refused(data: st.DataObject) -> None:
    datagram = bytearray(keyed(KEY_A).seal(PAYLOAD, NOW))
    index = data.draw(st.integers(0, len(datagram) - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="xor")
    datagram[index] ^= flip
    with pytest.raises(AuthenticationError):
        keyed(KEY_A).open(bytes(datagram), NOW)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_random_bytes_never_open(raw: bytes) -> None:
    for receiver in (keyed(KEY_A), Authenticator.open_mode()):
        with pytest.raises(AuthenticationError):
            receiver.open(raw, NOW)


def test_truncated_datagram_is_refused() -> None:
    datagram = keyed(KEY_A).seal(PAYLOAD, NOW)
    for cut in (0, 1, AUTH_OVERHEAD - 1, len(datagram) - 1):
        with pytest.raises(AuthenticationError):
            keyed(KEY_A).open(datagram[:cut], NOW)


def test_wrong_key_is_refused() -> None:
    impostor = ClusterKey(1, bytes(32))  # same id, other secret
    datagram = keyed(impostor).seal(PAYLOAD, NOW)
    with pytest.raises(AuthenticationError, match="bad tag"):
        keyed(KEY_A).open(datagram, NOW)


def test_unknown_key_id_is_refused() -> None:
    datagram = keyed(KEY_B).seal(PAYLOAD, NOW)
    with pytest.raises(AuthenticationError, match="key id 2"):
        keyed(KEY_A).open(datagram, NOW)


def test_keyed_node_refuses_open_datagrams() -> None:
    datagram = Authenticator.open_mode().seal(PAYLOAD, NOW)
    with pytest.raises(AuthenticationError, match="open"):
        keyed(KEY_A).open(datagram, NOW)


def test_open_node_refuses_keyed_datagrams() -> None:
    datagram = keyed(KEY_A).seal(PAYLOAD, NOW)
    with pytest.raises(AuthenticationError, match="open mode"):
        Authenticator.open_mode().open(datagram, NOW)


def test_open_mode_requires_zero_tag() -> None:
    datagram = bytearray(Authenticator.open_mode().seal(PAYLOAD, NOW))
    datagram[-1] = 1
    with pytest.raises(AuthenticationError):
        Authenticator.open_mode().open(bytes(datagram), NOW)


def test_open_with_end_verifies_a_block_followed_by_other_bytes() -> None:
    sealed = keyed(KEY_A).seal(PAYLOAD, NOW)
    datagram = sealed + b"trailing bytes the tag does not cover"
    assert keyed(KEY_A).open(datagram, NOW, end=len(sealed)) == PAYLOAD
    changed = sealed + b"other trailing bytes"
    assert keyed(KEY_A).open(changed, NOW, end=len(sealed)) == PAYLOAD
    # Without ``end`` the block is looked for at the very end: not there.
    with pytest.raises(AuthenticationError):
        keyed(KEY_A).open(datagram, NOW)
    open_sealed = Authenticator.open_mode().seal(PAYLOAD, NOW)
    assert Authenticator.open_mode().open(open_sealed + b"x", NOW, end=len(open_sealed)) == PAYLOAD


@pytest.mark.parametrize("end", [-1, 0, AUTH_OVERHEAD - 1, 10**9])
def test_open_refuses_an_end_outside_the_datagram(end: int) -> None:
    datagram = keyed(KEY_A).seal(PAYLOAD, NOW) + b"tail"
    for receiver in (keyed(KEY_A), Authenticator.open_mode()):
        with pytest.raises(AuthenticationError):
            receiver.open(datagram, NOW, end=end)


@settings(max_examples=200)
@given(st.data())
def test_any_tampered_byte_before_end_is_refused(data: st.DataObject) -> None:
    sealed = keyed(KEY_A).seal(PAYLOAD, NOW)
    datagram = bytearray(sealed + bytes(100))
    index = data.draw(st.integers(0, len(sealed) - 1), label="index")
    datagram[index] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(AuthenticationError):
        keyed(KEY_A).open(bytes(datagram), NOW, end=len(sealed))


def test_seal_refuses_negative_time() -> None:
    with pytest.raises(UsageError):
        keyed(KEY_A).seal(PAYLOAD, -1.0)


# --- rotation --------------------------------------------------------------------------------


def test_old_key_accepted_during_rotation_and_refused_after() -> None:
    old_sender = keyed(KEY_A)
    ring = KeyRing(KEY_A)
    ring.rotate(KEY_B, now=NOW, grace=60.0)
    receiver = Authenticator.keyed(ring, window=1000.0)
    assert ring.current is KEY_B
    assert ring.accepted_ids(NOW) == [2, 1]

    assert receiver.open(old_sender.seal(PAYLOAD, NOW + 59), NOW + 59) == PAYLOAD
    assert receiver.open(keyed(KEY_B).seal(PAYLOAD, NOW + 59), NOW + 59) == PAYLOAD
    with pytest.raises(AuthenticationError, match="key id 1"):
        receiver.open(old_sender.seal(PAYLOAD, NOW + 61), NOW + 61)
    assert ring.accepted_ids(NOW + 61) == [2]
    assert receiver.open(keyed(KEY_B).seal(PAYLOAD, NOW + 61), NOW + 61) == PAYLOAD


def test_new_key_can_be_accepted_before_it_is_used() -> None:
    ring = KeyRing(KEY_A)
    ring.accept(KEY_B)
    receiver = Authenticator.keyed(ring)
    assert receiver.open(keyed(KEY_B).seal(PAYLOAD, NOW), NOW) == PAYLOAD
    # Still sending with A until rotated.
    assert keyed(KEY_A).open(receiver.seal(PAYLOAD, NOW), NOW) == PAYLOAD


def test_rotation_refuses_reused_key_ids() -> None:
    ring = KeyRing(KEY_A)
    with pytest.raises(UsageError):
        ring.rotate(ClusterKey(1, bytes(32)), now=NOW, grace=1)
    with pytest.raises(UsageError):
        ring.accept(ClusterKey(1, bytes(32)))
    ring.accept(KEY_B)
    with pytest.raises(UsageError):
        ring.accept(ClusterKey(2, bytes(32)))
    with pytest.raises(UsageError):
        ring.rotate(KEY_B, now=NOW, grace=-1)


# --- replay window ---------------------------------------------------------------------------


def test_replay_is_refused() -> None:
    receiver = keyed(KEY_A)
    datagram = keyed(KEY_A).seal(PAYLOAD, NOW)
    receiver.open(datagram, NOW)
    with pytest.raises(ReplayError, match="already seen"):
        receiver.open(datagram, NOW + 1)


def test_replay_state_is_created_only_for_authentic_datagrams() -> None:
    receiver = keyed(KEY_A)
    forged = bytearray(keyed(KEY_A).seal(PAYLOAD, NOW))
    forged[0] ^= 1
    with pytest.raises(AuthenticationError):
        receiver.open(bytes(forged), NOW)
    assert receiver.replay is not None
    assert len(receiver.replay) == 0


@pytest.mark.parametrize("skew", [-10.002, 10.002, -3600.0, 3600.0])
def test_timestamp_outside_window_is_refused(skew: float) -> None:
    receiver = keyed(KEY_A, window=10.0)
    datagram = keyed(KEY_A).seal(PAYLOAD, NOW + skew)
    with pytest.raises(ClockSkewError):
        receiver.open(datagram, NOW)


@pytest.mark.parametrize("skew", [-9.9, 0.0, 9.9])
def test_timestamp_inside_window_is_accepted(skew: float) -> None:
    receiver = keyed(KEY_A, window=10.0)
    assert receiver.open(keyed(KEY_A).seal(PAYLOAD, NOW + skew), NOW) == PAYLOAD


def test_replay_memory_is_bounded_by_capacity() -> None:
    window = ReplayWindow(window=10.0, capacity=100)
    now_ms = int(NOW * 1000)
    for nonce in range(1000):
        window.check(1, nonce, now_ms + nonce, NOW + nonce / 1000)
        assert len(window) <= 100
    assert len(window) == 100


def test_full_replay_memory_moves_the_floor_instead_of_forgetting() -> None:
    window = ReplayWindow(window=10.0, capacity=3)
    now_ms = int(NOW * 1000)
    for nonce in range(4):  # the fourth evicts the first (timestamp now_ms + 0)
        window.check(1, nonce, now_ms + nonce, NOW)
    with pytest.raises(ReplayError):  # the evicted nonce cannot be replayed...
        window.check(1, 0, now_ms, NOW)
    with pytest.raises(ReplayError, match="older than"):  # ...nor anything as old
        window.check(1, 99, now_ms, NOW)
    window.check(1, 100, now_ms + 10, NOW)  # newer traffic still flows


def test_replay_memory_expires_with_time() -> None:
    window = ReplayWindow(window=10.0, capacity=1000)
    now_ms = int(NOW * 1000)
    for nonce in range(50):
        window.check(1, nonce, now_ms, NOW)
    assert len(window) == 50
    window.check(1, 999, now_ms + 20_000, NOW + 20)
    assert len(window) == 1
    # An expired nonce replayed later is refused by its timestamp.
    with pytest.raises(ClockSkewError):
        window.check(1, 0, now_ms, NOW + 20)


def test_same_nonce_under_another_key_is_not_a_replay() -> None:
    window = ReplayWindow()
    now_ms = int(NOW * 1000)
    window.check(1, 42, now_ms, NOW)
    window.check(2, 42, now_ms, NOW)
    with pytest.raises(ReplayError):
        window.check(2, 42, now_ms, NOW)


def test_replay_window_validates_arguments() -> None:
    with pytest.raises(UsageError):
        ReplayWindow(window=0)
    with pytest.raises(UsageError):
        ReplayWindow(capacity=0)


def test_injected_nonce_source_is_used() -> None:
    sender = counter_nonces()
    first = sender.seal(PAYLOAD, NOW)
    second = sender.seal(PAYLOAD, NOW)
    nonce_at = len(PAYLOAD) + 10
    assert int.from_bytes(first[nonce_at : nonce_at + 8], "big") == 1
    assert int.from_bytes(second[nonce_at : nonce_at + 8], "big") == 2


# --- key files (rotation) ---------------------------------------------------------------------


def test_a_key_file_holds_one_key_or_id_lines_sending_with_the_first() -> None:
    a, b = KEY_A.secret.hex(), KEY_B.secret.hex()
    assert parse_cluster_keys(a + "\n") == [ClusterKey(1, KEY_A.secret)]
    keys = parse_cluster_keys(f"# rotating\n2:{b}\n\n1:{a}  # old, until Friday\n")
    assert [k.key_id for k in keys] == [2, 1]
    assert parse_cluster_keys(f"2:{b},1:{a}") == keys  # the environment form
    ring = keyring_from(keys)
    assert ring.current.key_id == 2 and ring.accepted_ids(NOW) == [2, 1]
    # Rotation steps: a node sending with the old key opens the new one's datagrams and back.
    old_first = Authenticator.keyed(keyring_from(parse_cluster_keys(f"1:{a}\n2:{b}")))
    new_first = Authenticator.keyed(ring)
    assert new_first.open(old_first.seal(PAYLOAD, NOW), NOW) == PAYLOAD
    assert old_first.open(new_first.seal(PAYLOAD, NOW), NOW) == PAYLOAD
    only_new = Authenticator.keyed(keyring_from(parse_cluster_keys(f"2:{b}")))
    with pytest.raises(AuthenticationError, match="key id 1"):
        only_new.open(old_first.seal(PAYLOAD, NOW), NOW)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no cluster key"),
        ("# only a comment", "no cluster key"),
        ("00" * 32 + "\n" + "11" * 32, "need ids"),
        ("1:" + "00" * 32 + "\n1:" + "11" * 32, "listed twice"),
        ("x:" + "00" * 32, "key id must be a number"),
        ("0:" + "00" * 32, "1..255"),
        ("300:" + "00" * 32, "1..255"),
        ("1:" + "zz" * 32, "hexadecimal"),
        ("1:abcd", "64 hex digits"),
        ("\n".join(f"{i}:" + "00" * 32 for i in range(1, 10)), "at most 8"),
    ],
)
def test_bad_key_files_are_config_errors_without_key_material(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_cluster_keys(text)
    assert "00" * 16 not in str(info.value) and "zz" * 16 not in str(info.value)
