"""Holding and handing over a VM's frames while it migrates (sans-IO).

The pieces the virtual switch (:mod:`tmdht.vswitch`) composes; each is a small state machine
with time passed in (seconds, any monotonic origin):

- :class:`PortState` and :func:`transition`: the life of a VM port as an explicit table.
- :class:`HoldBuffer`: frames held for a VM that cannot take them now, bounded by count and
  bytes; what does not fit is refused (the caller counts it).
- :class:`FlowOrder`: per sending agent (origin), the sequence number of the last frame a port
  delivered. A frame is delivered only if its number is higher: within a flow nothing is
  delivered twice or out of order, whichever path (direct, forwarded, handed over) it took.
- :class:`OutboundHandover`: the source side of a handover: numbers the frames it sends the
  destination (``hseq``), retransmits what is not acknowledged, and *retains* every frame until
  the destination says its VM resumed, so that a migration that fails (the VM resumes at the
  source) loses nothing either.
- :class:`InboundHandover`: the destination side: puts the items back in ``hseq`` order, skips a
  gap only after ``gap_timeout``, says what to acknowledge.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from tmdht.errors import UsageError

__all__ = [
    "FlowOrder",
    "HeldFrame",
    "HoldBuffer",
    "InboundHandover",
    "OutboundHandover",
    "PortEvent",
    "PortState",
    "in_flow_order",
    "transition",
]

_MAX_RTO: Final = 1.0
_RETRY_CAP: Final = 0.25
"""Resent items' timers double up to this (or the current timeout, if longer): a lost item is
asked for again soon rather than late."""


class PortState(enum.Enum):
    """Where a VM port's frames go."""

    RUNNING = "running"
    """The VM runs here: frames are written to it."""
    PAUSED = "paused"
    """The VM stopped here (a pause, or the source side of a migration before the destination
    is known): frames are held here."""
    HANDING_OVER = "handing_over"
    """The VM stopped here and its destination is known: frames (held ones first) go to the
    destination agent, which holds them until the VM resumes there. Kept here too, until then."""
    MOVED = "moved"
    """The VM resumed elsewhere: stray frames that still arrive here are passed on."""
    INCOMING = "incoming"
    """A migration destination whose VM has not resumed yet: frames are held here."""


class PortEvent(enum.Enum):
    """What happens to a port."""

    STOP = "stop"
    """The VM stopped (QMP STOP)."""
    RESUME = "resume"
    """The VM runs (QMP RESUME)."""
    SUCCESSOR = "successor"
    """The destination of a migration is known and the stranded frames are accounted for."""
    SUCCESSOR_RESUMED = "successor_resumed"
    """The destination's VM resumed."""
    MOVED_ELSEWHERE = "moved_elsewhere"
    """A newer location of the MAC, without a handover from here."""


_TRANSITIONS: Final[dict[tuple[PortState, PortEvent], PortState]] = {
    (PortState.RUNNING, PortEvent.STOP): PortState.PAUSED,
    (PortState.PAUSED, PortEvent.RESUME): PortState.RUNNING,
    (PortState.PAUSED, PortEvent.SUCCESSOR): PortState.HANDING_OVER,
    (PortState.PAUSED, PortEvent.MOVED_ELSEWHERE): PortState.MOVED,
    (PortState.HANDING_OVER, PortEvent.RESUME): PortState.RUNNING,
    (PortState.HANDING_OVER, PortEvent.SUCCESSOR_RESUMED): PortState.MOVED,
    (PortState.HANDING_OVER, PortEvent.MOVED_ELSEWHERE): PortState.MOVED,
    (PortState.MOVED, PortEvent.RESUME): PortState.RUNNING,
    (PortState.INCOMING, PortEvent.RESUME): PortState.RUNNING,
}
"""Every transition there is; any other (state, event) pair leaves the state as it is."""


def transition(state: PortState, event: PortEvent) -> PortState | None:
    """The state after ``event``, or None if the event changes nothing in ``state``."""
    return _TRANSITIONS.get((state, event))


@dataclass(frozen=True, slots=True)
class HeldFrame:
    """A frame on its way to a VM, with what orders it."""

    origin: int
    """The agent the frame entered the network at."""
    seq: int
    """The origin's sequence number of the frame."""
    flags: int
    """:class:`tmdht.tunnel.FrameFlags` bits."""
    frame: bytes
    fence: int = 0
    """See :attr:`tmdht.tunnel.Frame.fence`."""
    since: float = 0.0
    """When it was held (for the hold timeout)."""


class HoldBuffer:
    """A FIFO of held frames, bounded by ``max_frames`` and ``max_bytes``."""

    def __init__(self, *, max_frames: int, max_bytes: int) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise UsageError("a hold buffer needs room for at least one frame")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._items: collections.deque[HeldFrame] = collections.deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[HeldFrame]:
        return iter(self._items)

    def push(self, item: HeldFrame) -> bool:
        """Hold ``item`` at the end; False (nothing held) if it does not fit."""
        size = len(item.frame)
        if len(self._items) >= self.max_frames or self.bytes + size > self.max_bytes:
            return False
        self._items.append(item)
        self.bytes += size
        return True

    def push_front(self, items: Iterable[HeldFrame]) -> int:
        """Put ``items`` (in their order) before everything held; returns how many did not fit
        (the newest held frames make room: older frames must not be lost for newer ones)."""
        items = list(items)
        dropped = 0
        for item in reversed(items):
            self._items.appendleft(item)
            self.bytes += len(item.frame)
        while len(self._items) > self.max_frames or self.bytes > self.max_bytes:
            self.bytes -= len(self._items.pop().frame)
            dropped += 1
        return dropped

    def drain(self) -> list[HeldFrame]:
        """Everything held, oldest first; the buffer is empty afterwards."""
        items = list(self._items)
        self._items.clear()
        self.bytes = 0
        return items

    def expire(self, before: float) -> int:
        """Drop frames held since before ``before``; returns how many."""
        dropped = 0
        while self._items and self._items[0].since < before:
            self.bytes -= len(self._items.popleft().frame)
            dropped += 1
        return dropped


def in_flow_order(items: list[HeldFrame]) -> list[HeldFrame]:
    """``items`` with each origin's frames sorted by seq, keeping the interleaving of origins.

    Frames held for a VM arrive by several paths (handed over by the source agent, sent
    directly); within an origin the arrival order may differ from the send order. The i-th
    frame of origin O in the result is O's i-th lowest seq; duplicates of an (origin, seq) are
    left out.
    """
    by_origin: dict[int, list[HeldFrame]] = {}
    for item in items:
        by_origin.setdefault(item.origin, []).append(item)
    queues: dict[int, collections.deque[HeldFrame]] = {}
    for origin, frames in by_origin.items():
        unique: dict[int, HeldFrame] = {}
        for frame in frames:
            unique.setdefault(frame.seq, frame)
        queues[origin] = collections.deque(sorted(unique.values(), key=lambda f: f.seq))
    ordered = []
    for item in items:
        queue = queues[item.origin]
        if queue:
            ordered.append(queue.popleft())
    return ordered


class FlowOrder:
    """Per origin, the seq of the last frame delivered to one port (bounded, LRU)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._last: collections.OrderedDict[int, int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def last(self, origin: int) -> int:
        """The last seq delivered from ``origin`` (0: none known)."""
        return self._last.get(origin, 0)

    def fresh(self, origin: int, seq: int) -> bool:
        """Whether a frame (origin, seq) comes after everything delivered from ``origin``."""
        return seq > self._last.get(origin, 0)

    def delivered(self, origin: int, seq: int) -> None:
        """Record a delivery (the seq never goes down)."""
        if seq > self._last.get(origin, 0):
            self._last[origin] = seq
        self._last.move_to_end(origin)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def roll_back(self, items: Iterable[HeldFrame]) -> None:
        """These frames were not delivered after all (they were stranded when the VM stopped):
        each origin's mark goes back to just before its lowest seq among them."""
        lowest: dict[int, int] = {}
        for item in items:
            if item.seq < lowest.get(item.origin, item.seq + 1):
                lowest[item.origin] = item.seq
        for origin, seq in lowest.items():
            if self._last.get(origin, 0) >= seq:
                self._last[origin] = seq - 1

    def merge(self, flows: Iterable[tuple[int, int]]) -> None:
        """Take (origin, seq) marks from elsewhere (a handover's BEGIN): the higher one wins."""
        for origin, seq in flows:
            self.delivered(origin, seq)

    def snapshot(self, limit: int) -> tuple[tuple[int, int], ...]:
        """The ``limit`` most recently used (origin, seq) marks."""
        items = list(self._last.items())[-limit:]
        return tuple(items)


@dataclass(slots=True)
class _Unacked:
    item: HeldFrame | None  # None: the BEGIN (hseq 0)
    sent_at: float
    rto: float
    resent: bool = False


class OutboundHandover:
    """The source side of one handover (see the module docstring).

    Items are numbered: 0 is the BEGIN, frames are 1, 2, ... The caller sends what :meth:`add`
    and :meth:`due` return (as HANDOVER_FRAME) and feeds acknowledgements to :meth:`acked`.
    """

    def __init__(self, handover: int, successor: int, *, rto: float, max_items: int) -> None:
        self.handover = handover
        self.successor = successor
        self.min_rto = rto
        self.rto = rto
        """The retransmission timeout of a new item: the smoothed acknowledgement time plus
        four deviations (RFC 6298, Karn: resent items give no sample), at least ``rto``, at
        most 1 s. A loaded destination is slow to acknowledge; a fixed short timeout would
        resend the whole window again and again."""
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._highest = -1  # highest item the destination said it has
        self.max_items = max_items
        self.next_hseq = 1
        self.acked = -1
        """Highest hseq the destination has acknowledged (cumulatively); -1: nothing yet."""
        self.resumed = False
        """The destination's VM resumed: retained frames are no longer needed for a failure."""
        self.retransmissions = 0
        self._unacked: collections.OrderedDict[int, _Unacked] = collections.OrderedDict()
        self._retained: collections.deque[tuple[int, HeldFrame]] = collections.deque()

    def begin(self, now: float) -> None:
        """The BEGIN (item 0) was sent."""
        self._unacked[0] = _Unacked(None, now, self.rto)

    @property
    def pending(self) -> int:
        """Items sent but not acknowledged."""
        return len(self._unacked)

    @property
    def retained(self) -> list[HeldFrame]:
        """Frames kept for re-delivery here, in hseq order."""
        return [item for _, item in self._retained]

    def full(self) -> bool:
        """No room for another frame (the caller counts it as an overflow)."""
        # Retained frames include the unacknowledged ones until the destination resumed; the
        # BEGIN (item 0) is no frame.
        unacked = len(self._unacked) - (1 if 0 in self._unacked else 0)
        return max(unacked, len(self._retained)) >= self.max_items

    def add(self, item: HeldFrame, now: float) -> int:
        """Number ``item`` for sending now; returns its hseq (check :meth:`full` first)."""
        hseq = self.next_hseq
        self.next_hseq += 1
        self._unacked[hseq] = _Unacked(item, now, self.rto)
        if not self.resumed:
            self._retained.append((hseq, item))
        return hseq

    def acked_up_to(self, acked: int, resumed: bool,
                    ranges: Iterable[tuple[int, int]] = (), now: float | None = None) -> None:
        """The destination has items 0..``acked`` and those in ``ranges`` (selectively
        acknowledged: not resent); ``resumed``: its VM runs. ``now`` (when the acknowledgement
        arrived) feeds the retransmission timeout."""
        newest: _Unacked | None = None
        self._highest = max(self._highest, acked)
        if acked > self.acked:
            self.acked = acked
            while self._unacked and next(iter(self._unacked)) <= acked:
                _, entry = self._unacked.popitem(last=False)
                newest = entry
        for first, last in ranges:
            self._highest = max(self._highest, last)
            if last - first < len(self._unacked):
                hseqs: Iterable[int] = range(first, last + 1)
            else:
                hseqs = [h for h in self._unacked if first <= h <= last]
            for hseq in hseqs:
                acked_entry = self._unacked.pop(hseq) if hseq in self._unacked else None
                if acked_entry is not None and (
                        newest is None or acked_entry.sent_at > newest.sent_at):
                    newest = acked_entry
        if now is not None and newest is not None and not newest.resent:
            self._sample(now - newest.sent_at)
        if resumed:
            self.resumed = True
        if self.resumed:
            while self._retained and self._retained[0][0] <= self.acked:
                self._retained.popleft()

    def _sample(self, seconds: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = seconds, seconds / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - seconds)
            self._srtt = 0.875 * self._srtt + 0.125 * seconds
        self.rto = min(_MAX_RTO, max(self.min_rto, self._srtt + 4 * self._rttvar))

    def due(self, now: float, limit: int = 256) -> list[tuple[int, HeldFrame | None]]:
        """Items whose retransmission timer ran out (oldest first, at most ``limit``): resend
        them. Each item's timer doubles, up to 0.25 s or the current timeout if longer.

        Items below the highest one the destination has are gaps: resent. Items above it may
        just be queued at a busy destination: only the oldest of them is resent (a probe), so
        an overloaded destination is not buried under the window again."""
        out = []
        probed = False
        for hseq, entry in self._unacked.items():
            if entry.sent_at + entry.rto <= now:
                if hseq > self._highest:
                    if probed:
                        continue
                    probed = True
                entry.sent_at = now
                entry.resent = True
                entry.rto = min(entry.rto * 2, max(_RETRY_CAP, self.rto))
                out.append((hseq, entry.item))
                self.retransmissions += 1
                if len(out) >= limit:
                    break
        return out

    def next_timer(self) -> float | None:
        """When the next retransmission is due."""
        if not self._unacked:
            return None
        return min(e.sent_at + e.rto for e in self._unacked.values())

    def restart(self, handover: int, successor: int) -> list[HeldFrame]:
        """A new destination (the old one restarted, or another one): forget the numbering and
        return the retained frames, to be sent again from hseq 1."""
        items = self.retained
        self.handover, self.successor = handover, successor
        self.next_hseq, self.acked, self.resumed = 1, -1, False
        self._unacked.clear()
        self._retained.clear()
        return items


class InboundHandover:
    """The destination side of one handover (see the module docstring)."""

    def __init__(self, handover: int, source: int, *, max_pending: int,
                 gap_timeout: float) -> None:
        self.handover = handover
        self.source = source
        self.max_pending = max_pending
        self.gap_timeout = gap_timeout
        self.expected = 0
        """The next hseq to deliver (0: the BEGIN has not arrived)."""
        self.skipped = 0
        """Items given up on (a gap that did not fill within ``gap_timeout``)."""
        self.duplicates = 0
        self.last_activity = 0.0
        self.unacked = 0
        """Items received since the last acknowledgement."""
        self._pending: dict[int, HeldFrame | None] = {}
        self._gap_since: float | None = None

    @property
    def acked(self) -> int:
        """What to acknowledge: every item below ``expected`` arrived (or was skipped)."""
        return self.expected - 1

    def ranges(self, limit: int) -> tuple[tuple[int, int], ...]:
        """Up to ``limit`` (first, last) runs of items received beyond the next one."""
        runs: list[tuple[int, int]] = []
        for hseq in sorted(self._pending):
            if runs and runs[-1][1] == hseq - 1:
                runs[-1] = (runs[-1][0], hseq)
            elif len(runs) < limit:
                runs.append((hseq, hseq))
            else:
                break
        return tuple(runs)

    def receive(self, hseq: int, item: HeldFrame | None,
                now: float) -> list[tuple[int, HeldFrame | None]]:
        """Take item ``hseq`` (None for the BEGIN); returns the items now deliverable, in order.

        Items already delivered count as duplicates; items beyond ``max_pending`` ahead of the
        next one are dropped (the source resends them).
        """
        self.last_activity = now
        self.unacked += 1
        if hseq < self.expected or hseq in self._pending:
            self.duplicates += 1
            return []
        if hseq - self.expected > self.max_pending:
            return []
        self._pending[hseq] = item
        out = []
        while self.expected in self._pending:
            out.append((self.expected, self._pending.pop(self.expected)))
            self.expected += 1
        self._gap_since = (now if self._gap_since is None else self._gap_since) \
            if self._pending else None
        return out

    def give_up_gap(self, now: float) -> list[tuple[int, HeldFrame | None]]:
        """If a gap has been open for ``gap_timeout``, skip it; returns what becomes
        deliverable."""
        if self._gap_since is None or now - self._gap_since < self.gap_timeout:
            return []
        first = min(self._pending)
        self.skipped += first - self.expected
        self.expected = first
        out = []
        while self.expected in self._pending:
            out.append((self.expected, self._pending.pop(self.expected)))
            self.expected += 1
        self._gap_since = now if self._pending else None
        return out

    def next_timer(self) -> float | None:
        """When an open gap is given up on."""
        return None if self._gap_since is None else self._gap_since + self.gap_timeout
