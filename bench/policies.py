"""Policy directories for the scenarios: copies of the shipped set without its quotas, with the
record cache off, or with quotas that count every call and never refuse one.

The shipped catalogue lets the broker reuse a fetched record for the same citizen for
``cache_ttl_s`` seconds (household 600, marriage 300). Scenarios that repeat one citizen's
lookups to time *fetching* (a department round trip, an audited lookup) would otherwise time
the cache from the second call on. They start the broker on :func:`uncached_policies` instead:
the very same rules and requests, only every ``cache_ttl_s`` is 0.

The shipped quotas (``quotas.yaml``: 120 lookups a minute per clerk) would refuse a benchmark's
one clerk within a second, so every copy here leaves them out (:func:`unlimited_policies`), and
the fast-path row that measures quota checking runs :func:`counting_policies`: the shipped
quotas with limits no run reaches, so every call is counted and none refused.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from bench.harness import BenchError
from certbroker import config, policy

#: The broker's environment variable for its policy directory (see certbroker/config.py).
POLICY_DIR_ENV = "CERTBROKER_POLICY_DIR"
_TTL = re.compile(r"(cache_ttl_s:\s*)\d+")
_LIMIT = re.compile(r"((?:distinct_subjects|lookups):\s*)\d+")
#: A quota limit no benchmark run reaches (per window: the minute or the hour).
UNREACHED = 1_000_000_000
#: The file of the shipped set that declares its quotas.
QUOTAS_FILE = "quotas.yaml"


def unlimited_policies(target: Path, source: Path = config.DEFAULT_POLICY_DIR) -> Path:
    """Copy ``source`` to ``target`` (which must not exist) without its quotas; checked."""
    shutil.copytree(source, target)
    (target / QUOTAS_FILE).unlink(missing_ok=True)
    if _load(target).quotas:
        raise BenchError(f"quotas are declared outside {QUOTAS_FILE} in {target}")
    return target


def counting_policies(target: Path, source: Path = config.DEFAULT_POLICY_DIR) -> Path:
    """Copy ``source`` to ``target`` with every quota's limit raised to :data:`UNREACHED`: the
    broker checks and counts every lookup as in production, and refuses none."""
    shutil.copytree(source, target)
    path = target / QUOTAS_FILE
    path.write_text(_LIMIT.sub(rf"\g<1>{UNREACHED}", path.read_text("utf-8")), "utf-8")
    quotas = _load(target).quotas
    if not quotas or any(q.limit != UNREACHED for q in quotas):
        raise BenchError(f"could not raise the quota limits in {target}")
    return target


def _load(target: Path) -> policy.PolicySet:
    try:
        return policy.load(target)
    except policy.PolicyError as exc:
        raise BenchError(f"the policy copy in {target} is invalid: {exc}") from None


def uncached_policies(target: Path, source: Path = config.DEFAULT_POLICY_DIR) -> Path:
    """Copy ``source`` to ``target`` (which must not exist) with every ``cache_ttl_s`` set to 0
    and without quotas.

    Loads the copy to check that no record type is cached any more (BenchError otherwise: a
    catalogue whose TTLs this edit does not reach would silently time the cache) and that the
    copy is a valid policy set. Returns ``target``.
    """
    unlimited_policies(target, source)
    for path in target.glob("*.yaml"):  # what the broker loads (tests/ is not)
        text = path.read_text(encoding="utf-8")
        path.write_text(_TTL.sub(r"\g<1>0", text), encoding="utf-8")
    loaded = _load(target)
    cached = [rt.name for rt in loaded.record_types.values() if rt.cache_ttl_s]
    if cached:
        raise BenchError(f"could not turn the record cache off for {cached} in {target}")
    return target
