"""The event loop the broker runs on: uvloop where it is installed, else asyncio's own.

uvloop (a dependency on Linux) runs grpcio's aio server unchanged and took about 14 % off the
broker's server CPU per call (docs/benchmarks.md, issue 19): grpc.aio hands every
completion to the loop as a callback, and uvloop's callback and wake-up path is cheaper.
``CERTBROKER_EVENT_LOOP=asyncio`` forces asyncio's loop (for comparison, or a suspected loop
problem); anything else, or unset, means "uvloop if available".
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "loop_name", "run"]

T = TypeVar("T")
#: The environment variable that forces asyncio's own loop.
ENV = "CERTBROKER_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's ``new_event_loop`` when it is importable and not turned off, else asyncio's
    own loop class (whatever event loop policy is installed)."""
    if os.environ.get(ENV, "").strip().lower() != "asyncio":
        try:
            import uvloop
        except ImportError:  # not installed (not on Linux): asyncio's loop, only slower
            pass
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.SelectorEventLoop


def loop_name() -> str:
    """What :func:`run` would use: "uvloop" or "asyncio"."""
    return "asyncio" if loop_factory() is asyncio.SelectorEventLoop else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
