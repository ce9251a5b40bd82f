"""Migration waves in the sans-IO cores: OFFER/NEED on synthetic QEMU streams, the wave key
scheme, the credentials, the format's WAVE and OFFER records."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from support.synthetic import page_pool, qemu_stream

from tmdht.catalog import TemplateCatalog
from tmdht.catalog_file import TemplateDigests
from tmdht.errors import ConfigError, DecodeError, DigestMismatchError
from tmdht.migration_stream import (
    FLAG_WAVE,
    FLAG_WAVE_BUSY,
    Ack,
    BackRef,
    CompressedPage,
    ForwardDecoder,
    FullPage,
    Hello,
    Need,
    Offer,
    OfferPolicy,
    ReceiverRebuilder,
    ReverseDecoder,
    SenderRewriter,
    Template,
    WaveBusy,
    WaveHello,
    encode,
)
from tmdht.native import make_receiver, make_sender, native_module
from tmdht.pages import PAGE_SIZE, digest_page
from tmdht.wave import (
    WAVE_SECRET_ENV,
    ClaimPolicy,
    ClaimWaits,
    WaveCredentials,
    expires_at,
    is_live,
)

POOL = page_pool(16, seed=4)
CATALOG = TemplateCatalog.from_digests([digest_page(p) for p in POOL[:6]])
BLOCKS = [("pc.ram", 256 * PAGE_SIZE), ("pc.bios", 4 * PAGE_SIZE)]
WAVE = WaveCredentials("rack-7", bytes(range(1, 33)))
OTHER = WaveCredentials("rack-7", bytes(range(2, 34)))


def guest_stream(seed: int, shared: list[bytes], *, shared_at: int = 0) -> bytes:
    """A guest: the shared application pages (same in every guest of the wave, from page
    ``shared_at`` on), templates, and pages of its own (its seed)."""
    rng = random.Random(seed)
    records = []
    for index in range(BLOCKS[0][1] // PAGE_SIZE):
        x = rng.random()
        if shared_at <= index < shared_at + len(shared):
            data = shared[index - shared_at]
        elif x < 0.2:
            data = POOL[rng.randrange(len(POOL))]
        elif x < 0.3:
            data = None
        else:
            data = rng.randbytes(PAGE_SIZE)
        records.append(("pc.ram", index, data))
    records.append(("pc.bios", 0, POOL[0]))
    stream, _ = qemu_stream(BLOCKS, [records, records[:20]])
    return stream


_SHARED_RNG = random.Random(99)
SHARED = [_SHARED_RNG.randbytes(PAGE_SIZE) for _ in range(120)]


POLICY = OfferPolicy(min_hit_rate=0.05, history=64, min_outcomes=16, probe_every=8)
"""Adaptive offering scaled down to the test's streams of a few hundred pages."""


def sender_for(wave: WaveCredentials | None, offer_window: int = 32 << 20, *,
               policy: OfferPolicy | None = POLICY) -> SenderRewriter:
    members = _digests().as_set()
    return SenderRewriter(CATALOG.catalog_id, lambda ds: [d in members for d in ds],
                          flow_window=1 << 30, wave_tag=None if wave is None else wave.tag,
                          offer_window=offer_window, offer_policy=policy)


def migrate(stream: bytes, store: dict[bytes, bytes], wave: WaveCredentials = WAVE, *,
            receiver_wave: WaveCredentials | None = None, offer_window: int = 32 << 20,
            chunk: int = 5000, policy: OfferPolicy | None = POLICY,
            busy_from: int | None = None,
            ) -> tuple[SenderRewriter, ReceiverRebuilder, bytes, int]:
    """One migration in memory: the receiver looks offers up in ``store`` (wave key -> page),
    asks the sender for the rest, and stores what it learned. Returns the wire bytes sent.
    ``busy_from``: the receiver sees other VMs of the wave busy from this stream offset on."""
    sender = sender_for(wave, offer_window, policy=policy)
    receiver_wave = wave if receiver_wave is None else receiver_wave
    rebuilder = ReceiverRebuilder(CATALOG.catalog_id, wave_tag=receiver_wave.tag)
    templates = {digest_page(p): p for p in POOL}
    out: list[bytes] = []
    wire = 0
    reverse = ReverseDecoder(sender.hello.flags)

    def pump(data: bytes) -> None:
        nonlocal wire
        wire += len(data)
        rebuilder.feed(data)
        for index, digest in rebuilder.wanted(10_000):
            rebuilder.supply(index, templates[digest])
        offers = rebuilder.wanted_offers(10_000)
        keys = receiver_wave.wave_keys([d for _, d in offers])
        missing = []
        for (index, _), key in zip(offers, keys, strict=True):
            page = store.get(key)
            if page is None:
                missing.append(index)
            else:
                rebuilder.supply_offered(index, page)
        rebuilder.unavailable(missing)
        out.extend(rebuilder.output())
        reverse.feed(rebuilder.requests() + rebuilder.ack(every=1))
        for record in reverse.records():
            if isinstance(record, Need):
                pump(sender.fallback(record))
            elif isinstance(record, WaveBusy):
                sender.wave_busy(record)
            else:
                sender.acknowledge(record)  # type: ignore[arg-type]

    pump(sender.start())
    for i in range(0, len(stream), chunk):
        if busy_from is not None and i >= busy_from:
            rebuilder.others_busy()
        pump(sender.feed(stream[i : i + chunk]))
    pump(sender.finish())
    out.extend(rebuilder.output())
    for digest, page in rebuilder.learned():
        store[receiver_wave.wave_key(digest)] = page
    assert rebuilder.verified
    assert b"".join(out) == stream
    return sender, rebuilder, b"".join(out), wire


def test_second_guest_of_a_wave_sends_far_fewer_bodies() -> None:
    store: dict[bytes, bytes] = {}
    first, _, _, wire1 = migrate(guest_stream(1, SHARED), store)
    second, rebuilder, _, wire2 = migrate(guest_stream(2, SHARED), store)
    assert first.wave.offers > 0 and first.wave.bodies == first.wave.offers
    # The shared pages are found in the wave store: the second guest sends bodies only for
    # the pages of its own.
    assert rebuilder.stats.wave_pages >= len(SHARED)
    assert second.wave.bodies <= second.wave.offers - len(SHARED)
    assert wire2 < wire1 - len(SHARED) * 4000
    assert rebuilder.stats.offers == second.wave.offers
    assert rebuilder.stats.offer_bodies == second.wave.bodies


def test_offering_adapts_to_what_the_wave_store_holds() -> None:
    """The first VM finds nothing: once min_outcomes offers are settled it sends its pages
    whole (still stored for the wave) and offers one in probe_every; the next VM offers while
    offers are found, and goes back to offering when probes are found again."""
    own = len(_own_pages(guest_stream(1, SHARED)))
    store: dict[bytes, bytes] = {}
    first, rebuilder1, _, wire1 = migrate(guest_stream(1, SHARED), store)
    assert first.wave.hits == 0 and first.wave.bodies == first.wave.offers
    assert first.wave.whole > own // 2  # most pages went whole, not offered
    assert POLICY.min_outcomes <= first.wave.offers < own // 2
    assert first.offer_hit_rate == 0.0
    # ... and the receiver learned every page it received, offered or not.
    assert all(WAVE.wave_key(digest_page(p)) in store for p in SHARED)
    assert rebuilder1.stats.full_pages == first.counts.full_pages >= first.wave.whole
    # Shared pages after a stretch of the guest's own: probes find them, offering resumes.
    second, rebuilder2, _, _ = migrate(guest_stream(2, SHARED, shared_at=100), store)
    assert second.wave.hits == rebuilder2.stats.wave_pages
    assert second.wave.whole > 0
    assert second.wave.hits >= len(SHARED) - 2 * POLICY.probe_every
    # A VM of a warm wave keeps offering through a run of its own pages longer than the
    # policy's history (the share over all its offers so far decides too).
    third, _, _, _ = migrate(guest_stream(3, SHARED), store)
    assert third.wave.whole == 0 and third.wave.hits >= len(SHARED)
    assert third.wave.offers - third.wave.hits > POLICY.history
    # Without a policy every page is offered (and the first VM's wire bytes grow).
    every, _, _, wire_all = migrate(guest_stream(1, SHARED), {}, policy=None)
    assert every.wave.whole == 0 and every.wave.offers == first.wave.offers + first.wave.whole
    assert wire_all > wire1
    with pytest.raises(ValueError):
        OfferPolicy(min_outcomes=0)


def test_reading_stops_while_offers_are_expected_to_need_many_bodies() -> None:
    """QEMU's stream is not read far ahead of what crossed: the offers awaiting an answer
    count with the bodies they are expected to need (all of them before any is settled)."""
    sender = SenderRewriter(CATALOG.catalog_id, lambda ds: [False] * len(ds),
                            flow_window=1 << 30, wave_tag=WAVE.tag, offer_policy=None,
                            offer_ahead=20 * PAGE_SIZE)
    decoder = ForwardDecoder()
    decoder.feed(sender.start() + sender.feed(guest_stream(1, SHARED)))
    bodies = [r for r in decoder.records()
              if isinstance(r, FullPage | CompressedPage | Offer | Template | BackRef)]
    offered = [i for i, r in enumerate(bodies) if isinstance(r, Offer)]
    assert len(offered) == sender.wave.offers > 21 and not sender.window_open
    assert sender.offer_backlog == len(offered) * PAGE_SIZE
    half = len(offered) // 2
    sender.fallback(Need(tuple(offered[:half])))  # the first half were not found
    assert sender.offer_backlog == (len(offered) - half) * PAGE_SIZE
    sender.acknowledge(Ack(offered[-10], 0))  # the rest but 10 were found
    assert sender.wave.hits == len(offered) - 10 - half
    share = half / (len(offered) - 10)
    assert sender.offer_backlog == int(10 * PAGE_SIZE * share) and sender.window_open
    without = sender_for(None)
    without.feed(guest_stream(1, SHARED))
    assert without.offer_backlog == 0 and without.window_open


def test_needs_before_the_ack_do_not_make_a_warm_wave_look_cold() -> None:
    """A NEED comes back within a round trip, a found page only with the next ACK: offers are
    judged once an ACK covers them, so early NEEDs alone never switch to sending whole."""
    rng = random.Random(8)
    pages = [p for shared in SHARED[:100] for p in (shared, rng.randbytes(PAGE_SIZE))]
    stream, _ = qemu_stream([("pc.ram", len(pages) * PAGE_SIZE)],
                            [[("pc.ram", i, page) for i, page in enumerate(pages)]])
    sender = sender_for(WAVE)
    decoder = ForwardDecoder()
    decoder.feed(sender.start() + sender.feed(stream[: len(stream) // 2]))
    offers = [(i, r) for i, r in enumerate(r for r in decoder.records()
                                           if isinstance(r, FullPage | Offer))]
    own = tuple(i for i, r in offers if isinstance(r, Offer) and r.digest not in
                {digest_page(p) for p in SHARED})
    assert len(own) > POLICY.min_outcomes
    sender.fallback(Need(own))  # every own page: not found; the shared ones await the ACK
    sender.feed(stream[len(stream) // 2 :])
    assert sender.wave.whole == 0
    sender.acknowledge(Ack(own[-1] + 1, 0))
    assert sender.offer_hit_rate is not None and 0.4 < sender.offer_hit_rate < 0.6


def _own_pages(stream: bytes) -> list[bytes]:
    """The non-template pages of a stream that no earlier page repeats (the offered ones)."""
    sender = sender_for(None)
    decoder = ForwardDecoder()
    decoder.feed(sender.start() + sender.feed(stream) + sender.finish())
    return [r.data for r in decoder.records() if isinstance(r, FullPage)]


def test_a_wave_page_is_not_resolvable_with_another_waves_secret() -> None:
    store: dict[bytes, bytes] = {}
    migrate(guest_stream(1, SHARED), store)
    digests = [digest_page(p) for p in SHARED]
    assert all(WAVE.wave_key(d) in store for d in digests)
    assert not any(OTHER.wave_key(d) in store for d in digests)
    assert not any(WaveCredentials("rack-8", WAVE.secret).wave_key(d) in store for d in digests)
    # ... so a migration in the other wave finds nothing and sends every body.
    sender, rebuilder, _, _ = migrate(guest_stream(2, SHARED), store, OTHER)
    assert rebuilder.stats.wave_pages == 0 and sender.wave.bodies == sender.wave.offers


def test_a_receiver_of_another_wave_refuses_the_stream() -> None:
    with pytest.raises(DecodeError, match="another wave"):
        migrate(guest_stream(1, SHARED), {}, WAVE, receiver_wave=OTHER)
    rebuilder = ReceiverRebuilder(CATALOG.catalog_id)  # no --wave
    with pytest.raises(DecodeError, match="give this receiver --wave"):
        rebuilder.feed(sender_for(WAVE).start())
        rebuilder.output()


def test_a_wrong_wave_page_is_refused_and_comes_from_the_sender() -> None:
    stream = guest_stream(1, SHARED)
    store: dict[bytes, bytes] = {}
    migrate(stream, store)
    poisoned = {key: bytes(PAGE_SIZE - 1) + b"x" for key in store}
    sender = sender_for(WAVE)
    rebuilder = ReceiverRebuilder(CATALOG.catalog_id, wave_tag=WAVE.tag)
    rebuilder.feed(sender.start() + sender.feed(stream))
    for index, digest in rebuilder.wanted_offers(10_000):
        with pytest.raises(DigestMismatchError):
            rebuilder.supply_offered(index, poisoned[WAVE.wave_key(digest)])
        rebuilder.unavailable([index])
    assert rebuilder.stats.wave_pages == 0


def test_a_full_offer_window_sends_pages_whole_instead() -> None:
    sender, _, _, _ = migrate(guest_stream(3, SHARED), {}, offer_window=8 * PAGE_SIZE,
                              chunk=200_000)
    assert sender.wave.window_full > 0 and sender.wave.offers > 0
    assert sender.counts.full_pages >= sender.wave.window_full


def test_without_a_wave_the_stream_has_no_wave_records_and_matches_the_native_core() -> None:
    stream = guest_stream(5, SHARED)
    plain = sender_for(None)
    wire = plain.start() + plain.feed(stream) + plain.finish()
    decoder = ForwardDecoder()
    decoder.feed(wire)
    records = list(decoder.records())
    assert decoder.hello is not None and not decoder.hello.flags & FLAG_WAVE
    assert not any(isinstance(r, Offer | WaveHello) for r in records)
    assert any(isinstance(r, Template) for r in records)
    if native_module() is not None:
        native = make_sender(_digests(), flow_window=1 << 30)
        assert native.start() + native.feed(stream) + native.finish() == wire
    assert plain.wave.offers == 0


def _digests() -> TemplateDigests:
    return TemplateDigests(CATALOG.catalog_id, CATALOG.digests.tobytes())


def test_wave_cores_are_the_reference() -> None:
    assert isinstance(make_receiver(None, wave_tag=WAVE.tag), ReceiverRebuilder)


def test_format_refuses_wave_records_outside_a_wave() -> None:
    hello = Hello(CATALOG.catalog_id, 16, 1 << 20, 0)
    offer = encode(Offer((0x28).to_bytes(8, "big"), bytes(32)))
    for bad in (encode(WaveHello(WAVE.tag)), offer):
        decoder = ForwardDecoder()
        decoder.feed(encode(hello) + bad)
        with pytest.raises(DecodeError):
            list(decoder.records())
    waved = Hello(CATALOG.catalog_id, 16, 1 << 20, FLAG_WAVE)
    decoder = ForwardDecoder()
    decoder.feed(encode(waved) + offer)  # OFFER before WAVE
    with pytest.raises(DecodeError):
        list(decoder.records())
    decoder = ForwardDecoder()
    decoder.feed(encode(waved) + encode(WaveHello(WAVE.tag)) + encode(WaveHello(WAVE.tag)))
    with pytest.raises(DecodeError, match="second WAVE"):
        list(decoder.records())
    decoder = ForwardDecoder()
    decoder.feed(encode(waved) + encode(WaveHello(WAVE.tag))[:10])
    assert list(decoder.records()) == []  # waits for the rest
    decoder.feed(encode(WaveHello(WAVE.tag))[10:] + offer)
    assert [type(r) for r in decoder.records()] == [WaveHello, Offer]


def test_keys_and_credentials(tmp_path: Path) -> None:
    digest = digest_page(POOL[0])
    assert WAVE.wave_key(digest) != digest and len(WAVE.wave_key(digest)) == 32
    assert WAVE.wave_keys([digest]) == [WAVE.wave_key(digest)]
    assert WAVE.tag != OTHER.tag != WaveCredentials("rack-8", WAVE.secret).tag
    assert WAVE.secret.hex() not in repr(WAVE)
    path = tmp_path / "wave.key"
    path.write_text(WaveCredentials.generate_secret())
    loaded = WaveCredentials.load("w", secret_file=path)
    assert loaded == WaveCredentials.load("w", env={WAVE_SECRET_ENV: path.read_text()})
    for text in ("", "zz" * 32, "00" * 32, "ab" * 31):
        path.write_text(text)
        with pytest.raises(ConfigError, match="wave secret"):
            WaveCredentials.load("w", secret_file=path)
    with pytest.raises(ConfigError, match=WAVE_SECRET_ENV):
        WaveCredentials.load("w", env={})
    with pytest.raises(ConfigError):
        WaveCredentials("", WAVE.secret)


def test_expiry_takes_the_clock_as_a_parameter() -> None:
    expiry = expires_at(100.0, 30.0)
    assert is_live(expiry, 129.9) and not is_live(expiry, 130.0)
    assert expires_at(0.0, 1e12) == 7 * 24 * 3600.0
    with pytest.raises(ConfigError):
        expires_at(0.0, 0.0)


def test_claim_waits_back_off_and_give_up_at_the_bound() -> None:
    policy = ClaimPolicy(wait=2.0, first_ask=0.1, backoff=2.0, max_interval=0.5, max_asks=100)
    waits = ClaimWaits(policy)
    assert waits.next_due() is None and waits.take_due(0.0, 10) == ([], [])
    assert waits.add(1, b"a" * 32, now=10.0) and waits.add(2, b"b" * 32, now=10.0)
    assert not waits.add(1, b"a" * 32, now=10.0)  # already waiting
    assert waits.next_due() == pytest.approx(10.1)
    assert waits.take_due(10.05, 10) == ([], [])
    asked, expired = waits.take_due(10.1, 10)
    assert asked == [(1, b"a" * 32), (2, b"b" * 32)] and not expired
    assert waits.next_due() is None  # asked: not due until answered
    waits.again([1], now=10.11)  # still pending: next ask after 0.1 * 2 ** 1 s
    waits.forget([2])  # found
    assert len(waits) == 1 and waits.next_due() == pytest.approx(10.31)
    times = []
    now = 10.31
    for _ in range(20):
        asked, expired = waits.take_due(now, 10)
        if expired:
            break
        assert asked == [(1, b"a" * 32)]
        times.append(now)
        waits.again([1], now)
        due = waits.next_due()
        assert due is not None
        now = due
    # Intervals grow to max_interval; the wait ends at the bound (2 s after it began).
    assert expired == [1] and now == pytest.approx(12.0) and len(waits) == 0
    steps = [b - a for a, b in itertools.pairwise(times)]
    assert steps[0] == pytest.approx(0.4) and max(steps) == pytest.approx(0.5)


def test_claim_waits_are_bounded_by_count_and_asks() -> None:
    waits = ClaimWaits(ClaimPolicy(wait=100.0, first_ask=1.0, max_interval=1.0, max_asks=2,
                                   max_waiting=2))
    assert waits.add(1, b"a" * 32, 0.0) and waits.add(2, b"b" * 32, 0.0)
    assert not waits.add(3, b"c" * 32, 0.0)  # full: the caller asks the sender at once
    for now in (1.0, 2.0):
        asked, expired = waits.take_due(now, 1)  # the limit: one at a time
        assert len(asked) == 1 and not expired
        waits.again([i for i, _ in asked], now)
        asked, expired = waits.take_due(now, 1)
        waits.again([i for i, _ in asked], now)
    assert waits.take_due(3.0, 10) == ([], [1, 2])  # two asks each: given up
    assert ClaimPolicy(wait=0).enabled is False
    with pytest.raises(ConfigError):
        ClaimPolicy(first_ask=0)
    with pytest.raises(ConfigError):
        ClaimPolicy(backoff=0.5)


def test_wave_busy_record_round_trip_and_strictness() -> None:
    """WAVE_BUSY is one byte on the reverse stream, valid only after a hello with
    FLAG_WAVE_BUSY (which needs FLAG_WAVE), and at most once."""
    busy = encode(WaveBusy())
    assert busy == b"\x14"
    need = encode(Need((3, 4)))
    decoder = ReverseDecoder(FLAG_WAVE | FLAG_WAVE_BUSY)
    decoder.feed(need + busy + encode(Ack(5, 9)))
    assert list(decoder.records()) == [Need((3, 4)), WaveBusy(), Ack(5, 9)]
    decoder.close()
    for flags in (0, FLAG_WAVE):  # without the flag: an unknown record, as before it existed
        decoder = ReverseDecoder(flags)
        decoder.feed(need + busy)
        with pytest.raises(DecodeError, match="unknown record type 0x14"):
            list(decoder.records())
    decoder = ReverseDecoder(FLAG_WAVE | FLAG_WAVE_BUSY)
    decoder.feed(busy + busy)
    with pytest.raises(DecodeError, match="second WAVE_BUSY"):
        list(decoder.records())
    decoder = ReverseDecoder(FLAG_WAVE | FLAG_WAVE_BUSY)
    decoder.feed(busy + b"\x15")  # a malformed stream after it: still a DecodeError
    with pytest.raises(DecodeError, match="unknown record type 0x15"):
        list(decoder.records())
    # The flag without FLAG_WAVE is refused both ways.
    lone = Hello(CATALOG.catalog_id, 16, 1 << 20, FLAG_WAVE_BUSY)
    with pytest.raises(ValueError, match="FLAG_WAVE_BUSY without FLAG_WAVE"):
        encode(lone)
    raw = bytearray(encode(Hello(CATALOG.catalog_id, 16, 1 << 20, FLAG_WAVE | FLAG_WAVE_BUSY)))
    raw[9] = FLAG_WAVE_BUSY
    forward = ForwardDecoder()
    forward.feed(bytes(raw))
    with pytest.raises(DecodeError, match="wave-busy flag"):
        list(forward.records())


def test_only_a_wave_sender_offers_wave_busy_and_the_receiver_says_it_once() -> None:
    assert sender_for(WAVE).hello.flags & FLAG_WAVE_BUSY
    plain = sender_for(None)
    assert plain.hello.flags & (FLAG_WAVE | FLAG_WAVE_BUSY) == 0
    with pytest.raises(DecodeError, match="FLAG_WAVE_BUSY"):
        plain.wave_busy(WaveBusy())
    rebuilder = ReceiverRebuilder(CATALOG.catalog_id, wave_tag=WAVE.tag)
    assert not rebuilder.others_busy()  # no hello yet: nothing to say it to
    rebuilder.feed(sender_for(WAVE).start())
    assert rebuilder.others_busy() and not rebuilder.others_busy()
    assert rebuilder.requests() == encode(WaveBusy())
    assert rebuilder.requests() == b""
    # A wave sender without the flag (an older one) never gets the record.
    old = ReceiverRebuilder(CATALOG.catalog_id, wave_tag=WAVE.tag)
    old.feed(encode(Hello(CATALOG.catalog_id, 16, 1 << 20, FLAG_WAVE))
             + encode(WaveHello(WAVE.tag)))
    assert not old.others_busy() and old.requests() == b""


def test_wave_busy_makes_the_sender_offer_every_page() -> None:
    """A VM running ahead finds nothing and goes whole; once its receiver says WAVE_BUSY it
    offers every page (as with offer_policy=None), so the others can claim them."""
    stream = guest_stream(1, SHARED)
    cold, _, _, _ = migrate(stream, {})
    assert cold.wave.whole > 0 and cold.wave.busy_seen == 0
    half = len(stream) // 2
    busy, rebuilder, _, _ = migrate(stream, {}, busy_from=half)
    assert busy.wave.busy_seen == 1
    assert 0 < busy.wave.whole < cold.wave.whole  # whole before the record, none after
    assert busy.wave.offers + busy.wave.whole == cold.wave.offers + cold.wave.whole
    assert rebuilder.stats.offers == busy.wave.offers
    # Sans-IO, step by step: pages go whole until the record, then every one is offered.
    sender = sender_for(WAVE)
    decoder = ForwardDecoder()
    decoder.feed(sender.start() + sender.feed(stream[:half]))
    offered = tuple(i for i, r in enumerate(
        r for r in decoder.records() if isinstance(r, FullPage | Offer | Template | BackRef))
        if isinstance(r, Offer))
    sender.fallback(Need(offered))  # none found
    sender.acknowledge(Ack(offered[-1] + 1, 0))
    sender.feed(stream[half : half + 40 * PAGE_SIZE])
    whole = sender.wave.whole
    assert whole > 0
    sender.wave_busy(WaveBusy())
    offers = sender.wave.offers
    sender.feed(stream[half + 40 * PAGE_SIZE :])
    assert sender.wave.whole == whole and sender.wave.offers > offers
