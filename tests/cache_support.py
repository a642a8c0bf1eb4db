"""Helpers for the cache tests over real brokers: policy copies, a spying source, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from certbroker import config
from certbroker.policy import RecordLimits
from certbroker.routing.router import DEFAULT_LIMITS, Fetched, RecordSource
from tests.helpers import BrokerThread, Env, make_config, running_env

#: A role for the tests: at the 24-hour hall it gets marriage records WITHOUT the window
#: clerk's spouse_resident_id mask, and only name and gender of the household record (the
#: window clerk gets four household fields). Same marriage fields, so one cache entry.
REGISTRAR_ROLE = """  - id: registrar
    name: 登记员（测试）
"""
REGISTRAR_RULE = """
  - id: registrar-24h
    description: test role, marriage records unmasked and two household fields.
    roles: [registrar]
    matters: [BDC-ZY-001]
    record_types: [marriage, household]
    fields:
      household: [name, gender]
    conditions:
      offices: ["gz-haizhu-24h-*"]
      consent: [id_card_read, signed_form]
"""


def write_policies(
    target: Path,
    *,
    ttl: dict[str, int] | None = None,
    registrar: bool = True,
    window_clerk_24h: str = "",
    quotas: bool = False,
) -> Path:
    """The shipped policy set in ``target`` (created or overwritten), changed as asked:
    ``ttl`` sets record types' ``cache_ttl_s``, ``registrar`` adds the test role above, and
    ``window_clerk_24h`` is inserted as YAML lines into that rule (e.g. a ``fields:`` block).
    Without the shipped quotas unless ``quotas``: a quota admission yields the event loop
    between a lookup's decision and the cache, which the single-flight tests time."""
    target.mkdir(parents=True, exist_ok=True)
    for source in config.DEFAULT_POLICY_DIR.glob("*.yaml"):
        if quotas or source.name != "quotas.yaml":
            shutil.copy(source, target / source.name)
    catalogue = (target / "catalogue.yaml").read_text(encoding="utf-8")
    for record_type, seconds in (ttl or {}).items():
        catalogue, n = re.subn(
            rf"(- name: {record_type}\b[^\n]*\n\s+department: \S+\n\s+cache_ttl_s: )\d+",
            rf"\g<1>{seconds}",
            catalogue,
        )
        assert n == 1, record_type
    (target / "catalogue.yaml").write_text(catalogue, encoding="utf-8")
    rules = (target / "rules.yaml").read_text(encoding="utf-8")
    if registrar:
        rules = rules.replace("roles:\n", "roles:\n" + REGISTRAR_ROLE, 1) + REGISTRAR_RULE
    if window_clerk_24h:
        anchor = "  - id: window-clerk-24h\n"
        assert anchor in rules
        rules = rules.replace(anchor, anchor + window_clerk_24h, 1)
    (target / "rules.yaml").write_text(rules, encoding="utf-8")
    return target


@contextlib.contextmanager
def running(tmp_path: Path, dataset_dir: Path, policy_dir: Path, **overrides: Any) -> Iterator[Env]:
    """A broker on ``policy_dir`` (callers' deadlines, not a short cap, bound fetches)."""
    overrides.setdefault("adapter_timeout_s", 30.0)
    cfg = make_config(tmp_path, dataset_dir, policy_dir=policy_dir, **overrides)
    with running_env(cfg, dataset_dir) as env:
        yield env


def reload_policies(thread: BrokerThread) -> None:
    """Reload the broker's policy directory the way SIGHUP does, and check it was accepted."""
    assert thread.broker is not None
    holder = thread.broker.policies

    async def reload() -> Any:
        result = holder.reload()
        return await result if inspect.isawaitable(result) else result

    assert thread.call(reload()) is True


class SpySource:
    """Stands between the broker and one department's real source: counts the calls that
    reach the department and what they asked for, and can hold a call until ``release()``
    says so (for single-flight tests)."""

    def __init__(self, inner: RecordSource) -> None:
        self.inner = inner
        self.calls: list[tuple[str, tuple[str, ...], str]] = []  # subject, fields, decision
        self.release: Callable[[], bool] | None = None

    async def fetch(
        self,
        record_type: str,
        subject_id: str,
        fields: Sequence[str],
        decision_id: str,
        timeout_s: float,
        limits: RecordLimits = DEFAULT_LIMITS,
    ) -> Fetched:
        self.calls.append((subject_id, tuple(fields), decision_id))
        if self.release is not None:
            for _ in range(3000):  # at most ~30 s; the test's assertions then tell what happened
                if self.release():
                    break
                await asyncio.sleep(0.01)
        return await self.inner.fetch(
            record_type, subject_id, fields, decision_id, timeout_s, limits
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def spy(thread: BrokerThread, record_type: str) -> SpySource:
    """Put a :class:`SpySource` in front of the broker's source for ``record_type``."""
    assert thread.broker is not None
    sources = thread.broker.router._sources
    wrapped = SpySource(sources[record_type])
    sources[record_type] = wrapped
    return wrapped


def sample(thread: BrokerThread, name: str, **labels: str) -> float:
    """A sample of the broker's metrics registry (0 when the series does not exist yet)."""
    assert thread.broker is not None
    value = thread.broker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def uncached_policies(tmp_path: Path) -> Path:
    """The shipped policy set with every ``cache_ttl_s`` 0, for tests about departments and
    routing, where each lookup must reach a department (as it does for property records)."""
    never = dict.fromkeys(("household", "social_security", "property", "marriage"), 0)
    return write_policies(tmp_path / "policies-uncached", ttl=never, registrar=False)
