"""The broker's event loop: uvloop where installed (the suite itself runs on it), asyncio's own
when ``CERTBROKER_EVENT_LOOP=asyncio`` says so."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import pytest

from certbroker.server import eventloop


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_runs_the_broker_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    installed = importlib.util.find_spec("uvloop") is not None
    assert installed == sys.platform.startswith("linux")  # a Linux dependency (pyproject)
    assert eventloop.loop_name() == ("uvloop" if installed else "asyncio")
    assert eventloop.run(_loop_type()).startswith("uvloop" if installed else "asyncio")


def test_the_variable_forces_asyncios_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.loop_name() == "asyncio"
    assert eventloop.run(_loop_type()).startswith("asyncio")


def test_the_suite_runs_on_the_brokers_loop() -> None:
    # tests/conftest.py installs the policy: every asyncio.run() in the tests gets this loop.
    module = asyncio.run(_loop_type())
    assert module.startswith("uvloop" if eventloop.loop_name() == "uvloop" else "asyncio")
