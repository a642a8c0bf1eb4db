"""Calls refused before any caller is known: counted per peer, audited as summaries, limited.

A call without a token, with a malformed, forged or otherwise refused token
(:class:`certbroker.errors.UnknownCaller`), or whose request cannot even be decoded
(``MALFORMED_REQUEST``) names nobody. Writing one durable entry for each would let anyone grow
the audit log without bound -- and with PostgreSQL its entries can never be deleted. So such a
call is not audited on its own: :meth:`RefusalLedger.refuse` counts it by peer and reason, and
every ``interval_s`` (and on :meth:`RefusalLedger.aclose`, at shutdown) each peer that was
refused gets ONE summary entry::

    kind             "unauthenticated"
    rule_id          "unauthenticated.summary"
    subject_id       the peer: "ipv4:203.0.113.7", "ipv6:[2001:db8:1:2::]/64", "unix:..."
                     (what the summary is about, as a registry entry names its endpoint)
    outcome_counts   reason -> calls refused with it ("TOKEN_MISSING": 180,
                     "MALFORMED_REQUEST": 2, ...), whatever status their callers got
    outcome          "REFUSED" (status "", decision "": no single call, no decision)
    decision_id      "calls=N;rate_limited=M;first=<time>;last=<time>" (UTC, ms): how many
                     calls, how many of them got RESOURCE_EXHAUSTED, the first and last
    clerk, office, roles   "" (nobody is known)

A peer is an IP address without its port (every connection has a new port), an IPv6 address
by its /64 (one host commonly owns a whole /64). Each peer may be refused ``rate_per_s``
times a second on average, ``burst`` at once (a token bucket); past that the caller gets
RESOURCE_EXHAUSTED ``UNAUTHENTICATED_RATE_LIMITED`` instead of its refusal, and the summary
counts the call under its own reason and in ``rate_limited``. Calls of a known caller are
never limited here: only refusals spend a peer's budget, so clerks behind the same address as
a misbehaving client keep working.

Memory is bounded: at most ``max_peers`` peers are tracked; refusals from further peers are
counted, and limited, together as the peer ``"other"``. Idle peers are forgotten once their
summary is written and their bucket is full again.

A summary that cannot be written is kept and retried at the next interval (the counts add
up); undecodable requests are logged at most once per interval, with their count, never
with a traceback. Runs on the event loop that serves the calls (not thread-safe).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from certbroker import errors
from certbroker.audit.events import AuditEvent, AuditLog

__all__ = [
    "KIND",
    "MALFORMED_REQUEST",
    "OTHER_PEERS",
    "RATE_LIMITED",
    "RefusalLedger",
    "malformed_request",
    "peer_key",
]

log = logging.getLogger(__name__)

#: ``kind`` of a summary entry.
KIND = "unauthenticated"
#: Reason of a call whose request could not be decoded (INVALID_ARGUMENT).
MALFORMED_REQUEST = "MALFORMED_REQUEST"
#: Reason of a refusal past the peer's rate (RESOURCE_EXHAUSTED).
RATE_LIMITED = "UNAUTHENTICATED_RATE_LIMITED"
#: The peer that refusals from peers beyond ``max_peers`` are counted under.
OTHER_PEERS = "other"
#: Longest peer text kept (a unix socket path could be anything).
_MAX_PEER_CHARS = 96


def malformed_request() -> errors.InvalidArgument:
    """The error a caller gets for bytes that are not the method's request message: generic
    (no parser detail, which would only help someone probing the parser)."""
    return errors.InvalidArgument(MALFORMED_REQUEST, "the request message could not be decoded")


def peer_key(peer: str) -> str:
    """The address a gRPC peer string (``context.peer()``) is counted under: IP without port,
    IPv6 by its /64; anything else as it is (clipped, ASCII-printable only)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0] or rest
        with contextlib.suppress(ValueError):
            return f"ipv4:{ipaddress.IPv4Address(host)}"
    elif kind == "ipv6":
        host = rest.rpartition(":")[0] if rest.startswith("[") else rest
        with contextlib.suppress(ValueError):
            network = ipaddress.IPv6Network(f"{host.strip('[]')}/64", strict=False)
            return f"ipv6:[{network.network_address}]/64"
    # The peer string comes from the transport, but keep it fit for a table either way.
    cleaned = "".join(c if " " < c < "\x7f" else "?" for c in peer[:_MAX_PEER_CHARS])
    return cleaned or "unknown"


@dataclass
class _Peer:
    """One peer's bucket and its counts since its last summary."""

    tokens: float
    updated: float  # monotonic time of the last refill
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    limited: int = 0
    first: float = 0.0  # wall-clock time of the first refusal counted, 0 when none
    last: float = 0.0

    def reset(self) -> None:
        """Start counting afresh (its summary is taken); the bucket stays as it is."""
        self.counts = collections.Counter()
        self.limited, self.first, self.last = 0, 0.0, 0.0


@dataclass(frozen=True)
class _Summary:
    peer: str
    counts: dict[str, int]
    limited: int
    first: float
    last: float


class RefusalLedger:
    """Counts, limits and summarizes refusals of unknown callers (module docstring).

    ``log`` gets the summaries (``None``: they stay counted until one is attached);
    ``policy_version`` names the policy set in force for their entries. ``clock`` (monotonic
    seconds) drives the buckets, ``wall`` (epoch seconds) the times in the summaries.
    """

    def __init__(
        self,
        log: AuditLog | None,
        *,
        rate_per_s: float = 5.0,
        burst: int = 20,
        interval_s: float = 10.0,
        max_peers: int = 4096,
        policy_version: Callable[[], str] = lambda: "",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not (rate_per_s > 0 and burst >= 1 and interval_s > 0 and max_peers >= 1):
            raise ValueError("need rate_per_s > 0, burst >= 1, interval_s > 0, max_peers >= 1")
        self.log = log
        self._rate = rate_per_s
        self._burst = float(burst)
        self._interval_s = interval_s
        self._max_peers = max_peers
        self._policy_version = policy_version
        self._clock = clock
        self._wall = wall
        self._peers: dict[str, _Peer] = {}
        self._unwritten: list[_Summary] = []  # summaries a failed write left for the next try
        self._malformed = 0  # undecodable requests since the last log line
        self._task: asyncio.Task[None] | None = None
        self._flushing: asyncio.Future[bool] | None = None  # the periodic write under way

    def refuse(self, peer: str, error: errors.BrokerError) -> errors.BrokerError:
        """Count one refused call from ``peer`` (a ``context.peer()`` string) and return the
        error its caller gets: ``error`` itself, or RESOURCE_EXHAUSTED ``RATE_LIMITED`` when
        the peer is past its rate."""
        now = self._clock()
        state = self._peer(peer_key(peer), now)
        state.tokens = min(self._burst, state.tokens + (now - state.updated) * self._rate)
        state.updated = now
        state.counts[error.reason] += 1
        state.last = self._wall()
        state.first = state.first or state.last
        if error.reason == MALFORMED_REQUEST:
            self._malformed += 1
        if state.tokens >= 1:
            state.tokens -= 1
            return error
        state.limited += 1
        return errors.ResourceExhausted(
            RATE_LIMITED,
            "too many unauthenticated calls from this address; try again later",
        )

    def _peer(self, key: str, now: float) -> _Peer:
        state = self._peers.get(key)
        if state is None:
            if len(self._peers) >= self._max_peers:
                key = OTHER_PEERS  # beyond the bound, every new peer shares one bucket
                state = self._peers.get(key)
            if state is None:
                state = self._peers[key] = _Peer(self._burst, now)
        return state

    @property
    def pending(self) -> int:
        """Refused calls counted but not yet in a written summary."""
        counted = sum(sum(p.counts.values()) for p in self._peers.values())
        return counted + sum(sum(s.counts.values()) for s in self._unwritten)

    def start(self) -> None:
        """Write the summaries every ``interval_s`` from now on (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="certbroker-unauthenticated-summaries"
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            # Shielded: stopping the task must not cut a write short (its summaries are
            # already taken from the counts); aclose waits for it instead.
            self._flushing = asyncio.ensure_future(self.flush())
            await asyncio.shield(self._flushing)

    async def aclose(self) -> None:
        """Stop the periodic task and write what is counted (shutdown: before the log closes)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._flushing is not None:
            await self._flushing  # a write under way finishes (or keeps its summaries)
            self._flushing = None
        await self.flush()

    async def flush(self) -> bool:
        """Write one summary entry per peer refused since the last flush (all in one
        transaction); True when nothing is left unwritten. On failure the summaries are kept
        for the next flush and the problem is logged."""
        self._log_malformed()
        summaries = self._unwritten + self._take()
        self._unwritten = []
        if not summaries:
            return True
        if self.log is None:
            self._unwritten = summaries
            return False
        version = self._policy_version()
        try:
            await self.log.append_many([self._event(s, version) for s in summaries])
        except Exception as exc:  # noqa: BLE001 - kept and retried; the broker serves on
            self._unwritten = summaries
            log.warning(
                "unauthenticated-call summaries not written (%d peer(s)), retrying in %g s: %s",
                len(summaries),
                self._interval_s,
                exc if isinstance(exc, errors.BrokerError) else type(exc).__name__,
            )
            return False
        return True

    def _take(self) -> list[_Summary]:
        """The counts since the last flush, reset; forgets peers idle with a full bucket."""
        now = self._clock()
        taken = []
        for key, state in list(self._peers.items()):
            if state.counts:
                taken.append(
                    _Summary(key, dict(state.counts), state.limited, state.first, state.last)
                )
                state.reset()
            elif state.tokens + (now - state.updated) * self._rate >= self._burst:
                del self._peers[key]  # nothing to report and nothing it could still spend
        return taken

    def _log_malformed(self) -> None:
        if self._malformed:
            log.warning(
                "refused %d undecodable request(s) (MALFORMED_REQUEST) in the last %g s",
                self._malformed,
                self._interval_s,
            )
            self._malformed = 0

    def _event(self, summary: _Summary, policy_version: str) -> AuditEvent:
        calls = sum(summary.counts.values())
        return AuditEvent(
            kind=KIND,
            clerk="",
            office="",
            roles=(),
            subject_id=summary.peer,
            matter_code="",
            case_number="",
            consent_method="",
            record_type="",
            decision="",
            rule_id=f"{KIND}.summary",
            withheld_fields=(),
            outcome="REFUSED",
            status="",
            policy_version=policy_version,
            department="",
            latency_ms=0.0,
            decision_id=(
                f"calls={calls};rate_limited={summary.limited};"
                f"first={_iso(summary.first)};last={_iso(summary.last)}"
            ),
            outcome_counts=dict(sorted(summary.counts.items())),
        )


def _iso(epoch: float) -> str:
    moment = time.gmtime(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{int(epoch % 1 * 1000):03d}Z"
