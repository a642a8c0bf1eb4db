"""Per-department circuit breakers for broker → adapter calls.

A department that keeps failing is not called at all for a while: lookups fail fast with
UNAVAILABLE ``CIRCUIT_OPEN`` (naming the department) instead of each waiting out its deadline,
and the department gets room to recover.

    closed ──(``failures`` consecutive failures)──▶ open
    open ──(``reset_s`` elapsed)──▶ half_open: exactly one probe call is let through
    half_open ──probe succeeds──▶ closed        half_open ──probe fails──▶ open (timer restarts)

What counts is decided by the caller (:mod:`certbroker.routing.router`): a failure is the
department not
answering usefully (UNAVAILABLE, a timeout within the broker's own budget); NOT_FOUND is a
success (the department answered). Outcomes that say nothing about the department (the
*caller's* short deadline ran out) are "neutral": they neither count nor reset.

Each admission carries the breaker's generation; a result that arrives after the state changed
(a slow call admitted before the breaker opened) is ignored, so stale news cannot close a
breaker that a newer failure opened or vice versa.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from certbroker import errors

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    """Breaker states as ``ListAdapters`` reports them."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    """How one admitted call went, as far as the department's health is concerned."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


@dataclass(frozen=True)
class Permit:
    """Admission to call the department once; hand it back to :meth:`CircuitBreaker.record`."""

    generation: int
    probe: bool


def circuit_open(department: str) -> errors.Unavailable:
    """The fail-fast error: UNAVAILABLE ``CIRCUIT_OPEN`` naming the department."""
    return errors.Unavailable(
        "CIRCUIT_OPEN",
        f"department {department} is failing; calls are paused (circuit breaker open)",
        department=department,
    )


class CircuitBreaker:
    """One department's breaker. Thread-safe; ``clock`` is monotonic seconds (tests fake it)."""

    def __init__(
        self,
        department: str,
        *,
        failures: int = 5,
        reset_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_settings(failures, reset_s)
        self.department = department
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._probing = False  # a half-open probe is in flight
        self._generation = 0  # bumped on every state change

    @property
    def state(self) -> State:
        """The current state (an open breaker whose time is up reads as half_open)."""
        with self._lock:
            self._tick()
            return self._state

    def admit(self) -> Permit:
        """Let one call through, or raise UNAVAILABLE ``CIRCUIT_OPEN``.

        While half-open only one probe is admitted at a time; the others fail fast until the
        probe's result is recorded.
        """
        with self._lock:
            self._tick()
            if self._state is State.CLOSED:
                return Permit(self._generation, probe=False)
            if self._state is State.HALF_OPEN and not self._probing:
                self._probing = True
                return Permit(self._generation, probe=True)
        raise circuit_open(self.department)

    def record(self, permit: Permit, outcome: Outcome) -> None:
        """Report how an admitted call went."""
        with self._lock:
            if permit.probe and permit.generation == self._generation:
                self._probing = False  # whatever happened, the probe slot is free again
            if permit.generation != self._generation or outcome is Outcome.NEUTRAL:
                return
            if outcome is Outcome.SUCCESS:
                self._failures = 0
                if self._state is not State.CLOSED:
                    self._change(State.CLOSED)
                return
            self._failures += 1
            if self._state is State.HALF_OPEN or self._failures >= self._threshold:
                self._opened_at = self._clock()
                self._change(State.OPEN)

    def _tick(self) -> None:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self._reset_s:
            self._change(State.HALF_OPEN)

    def _change(self, state: State) -> None:
        # Caller holds the lock.
        log.log(
            logging.WARNING if state is State.OPEN else logging.INFO,
            "circuit breaker of %s: %s -> %s",
            self.department,
            self._state,
            state,
        )
        self._state = state
        self._generation += 1
        self._probing = False
        if state is State.CLOSED:
            self._failures = 0


class BreakerBoard:
    """The breakers of every department, created on first use with the same settings."""

    def __init__(
        self,
        *,
        failures: int = 5,
        reset_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_settings(failures, reset_s)
        self._settings = (failures, reset_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, department: str) -> CircuitBreaker:
        """The department's breaker (closed when new)."""
        with self._lock:
            found = self._breakers.get(department)
            if found is None:
                failures, reset_s = self._settings
                found = self._breakers[department] = CircuitBreaker(
                    department, failures=failures, reset_s=reset_s, clock=self._clock
                )
            return found

    def state(self, department: str) -> State:
        """A department's breaker state; "closed" for one never called."""
        with self._lock:
            found = self._breakers.get(department)
        return State.CLOSED if found is None else found.state

    def states(self) -> Mapping[str, State]:
        """Every known breaker's state, by department."""
        with self._lock:
            breakers = dict(self._breakers)
        return {name: b.state for name, b in breakers.items()}


def _check_settings(failures: int, reset_s: float) -> None:
    # The board checks too, when it is built, so bad settings fail at start-up rather than
    # at the first call to a department.
    if failures < 1 or not reset_s > 0:
        raise ValueError("need failures >= 1 and reset_s > 0")
