"""Policy directories for the scenarios: the shipped set, or a copy with the record cache off.

The shipped catalogue lets the broker reuse a fetched record for the same citizen for
``cache_ttl_s`` seconds (household 600, marriage 300). Scenarios that repeat one citizen's
lookups to time *fetching* (a department round trip, an audited lookup) would otherwise time
the cache from the second call on. They start the broker on :func:`uncached_policies` instead:
the very same rules and requests, only every ``cache_ttl_s`` is 0.
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


def uncached_policies(target: Path, source: Path = config.DEFAULT_POLICY_DIR) -> Path:
    """Copy ``source`` to ``target`` (which must not exist) with every ``cache_ttl_s`` set to 0.

    Loads the copy to check that no record type is cached any more (BenchError otherwise: a
    catalogue whose TTLs this edit does not reach would silently time the cache) and that the
    copy is a valid policy set. Returns ``target``.
    """
    shutil.copytree(source, target)
    for path in target.glob("*.yaml"):  # what the broker loads (tests/ is not)
        text = path.read_text(encoding="utf-8")
        path.write_text(_TTL.sub(r"\g<1>0", text), encoding="utf-8")
    try:
        loaded = policy.load(target)
    except policy.PolicyError as exc:
        raise BenchError(f"the policy copy in {target} is invalid: {exc}") from None
    cached = [rt.name for rt in loaded.record_types.values() if rt.cache_ttl_s]
    if cached:
        raise BenchError(f"could not turn the record cache off for {cached} in {target}")
    return target
