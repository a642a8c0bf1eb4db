"""Entry times: the audit log's cached formatter writes exactly what ``epoch_time`` writes."""

from __future__ import annotations

import random

from certbroker.audit.events import epoch_time
from certbroker.audit.log import EntryTimes


def test_entry_times_match_epoch_time_to_the_letter() -> None:
    rng = random.Random(19)
    edges = [0.0, 1000.0, 1.9999995, 1.9999996, 1.0000004, 1764776400.9995, 1764776400.9999999]
    edges += [-1.5, -0.0000001, 59.9999999, 86399.9996]
    seconds = edges + [rng.uniform(0, 4e9) for _ in range(5000)]
    seconds += [1764776400 + i / 997 for i in range(3000)]  # many within the same second
    times = EntryTimes()
    assert [times.text(s) for s in seconds] == [epoch_time(s) for s in seconds]
