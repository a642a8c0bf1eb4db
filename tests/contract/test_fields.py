"""certbroker.contract.fields on real records: keep_fields against a plain walk of the descriptors,
and
from_dict against json_format.ParseDict, the two things the fast versions must equal."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from certbroker.adapters import demo
from certbroker.adapters.demo import synthetic
from certbroker.adapters.sdk import RecordNotFound
from certbroker.contract import fields
from certbroker.v1 import records_pb2


def reference_keep(message: Message, allowed: set[str], prefix: str = "") -> None:
    """keep_fields as first written: walk the descriptor on every call."""
    for field in message.DESCRIPTOR.fields:
        path = prefix + field.name
        expanded = (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and field.message_type.name == "PropertyHolding"
        )
        if expanded:
            if not any(a.startswith(path + ".") for a in allowed):
                message.ClearField(field.name)
                continue
            value = getattr(message, field.name)
            for item in value if field.is_repeated else [value]:
                reference_keep(item, allowed, path + ".")
        elif path not in allowed:
            message.ClearField(field.name)


def reference_parse(record_type: str, data: Any) -> tuple[Any, ...]:
    message = fields.RECORD_TYPES[record_type]()
    try:
        json_format.ParseDict(without_none(data), message)
    except Exception as exc:  # noqa: BLE001 - compared with what from_dict raises
        return ("error", type(exc).__name__, str(exc))
    return ("ok", message.SerializeToString(deterministic=True))


def fast_parse(record_type: str, data: Any) -> tuple[Any, ...]:
    message = fields.RECORD_TYPES[record_type]()
    try:
        fields.from_dict(data, message)
    except Exception as exc:  # noqa: BLE001 - compared with what ParseDict raises
        return ("error", type(exc).__name__, str(exc))
    return ("ok", message.SerializeToString(deterministic=True))


def without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [without_none(v) for v in value]
    return value


@pytest.fixture(scope="module")
def adapter_dicts(dataset_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """What the four demo adapters return for a few hundred citizens (every field asked)."""
    adapters = demo.build(dataset_dir)
    try:
        found: list[tuple[str, dict[str, Any]]] = []
        for subject in subjects(dataset_dir, 120):
            for record_type, adapter in adapters.items():
                try:
                    data = adapter.fetch(subject, fields.field_paths(record_type))
                except RecordNotFound:  # not every citizen has every record
                    continue
                found.append((record_type, dict(data)))
        return found
    finally:
        demo.close_all(adapters.values())


def subjects(dataset_dir: Path, count: int) -> Iterator[str]:
    import sqlite3

    with sqlite3.connect(synthetic.dataset_path(dataset_dir, "household")) as conn:
        for (resident,) in conn.execute("SELECT resident_id FROM residents LIMIT ?", (count,)):
            yield str(resident)


def records(adapter_dicts: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, Any]]:
    for record_type, data in adapter_dicts:
        message = fields.RECORD_TYPES[record_type]()
        json_format.ParseDict(without_none(data), message)
        yield record_type, message


def test_keep_fields_equals_the_descriptor_walk(
    adapter_dicts: list[tuple[str, dict[str, Any]]],
) -> None:
    rng = random.Random(20261121)
    kinds = set()
    for record_type, message in records(adapter_dicts):
        paths = fields.field_paths(record_type)
        for _ in range(6):
            allowed = rng.sample(paths, rng.randint(0, len(paths)))
            ours, theirs = copy.deepcopy(message), copy.deepcopy(message)
            fields.keep_fields(ours, allowed)
            reference_keep(theirs, set(allowed))
            assert ours == theirs, (record_type, allowed)
            kinds.add(record_type)
    assert kinds == set(fields.RECORD_TYPES)  # dotted paths (property) included


def test_field_paths_are_computed_once() -> None:
    assert fields.field_paths("property") is fields.field_paths("property")
    assert "holdings.address" in fields.field_paths("property")


#: Values swapped in for one key of an adapter's dict: every type the fast path must either
#: set exactly as ParseDict does or hand over to it (and then fail exactly as it does).
ODD_VALUES: list[Any] = [
    None,
    0,
    -7,
    2**70,
    1.5,
    5.0,
    float("nan"),
    float("inf"),
    True,
    "text",
    "7",
    "\ud800",
    "😀",
    [],
    ["a"],
    [None],
    [1, 2],
    [{}],
    {},
    {"x": 1},
    ("a",),
]


def test_from_dict_equals_parse_dict(adapter_dicts: list[tuple[str, dict[str, Any]]]) -> None:
    rng = random.Random(7)
    compared = 0
    for record_type, data in adapter_dicts:
        assert fast_parse(record_type, data) == reference_parse(record_type, data)
        for _ in range(8):
            changed = copy.deepcopy(data)
            target = changed
            nested = changed.get("members") or changed.get("holdings")
            if nested and rng.random() < 0.5:
                target = rng.choice(nested)
            key = rng.choice([*target, "unknown", "registeredAddress"])
            target[key] = rng.choice(ODD_VALUES)
            assert fast_parse(record_type, changed) == reference_parse(record_type, changed), (
                record_type,
                key,
                target[key],
            )
            compared += 1
    assert compared > 500


def test_from_dict_drops_none_at_every_depth() -> None:
    message = records_pb2.HouseholdRecord()
    fields.from_dict(
        {"name": "王伟", "gender": None, "members": [{"name": "李娜", "resident_id": None}]},
        message,
    )
    assert message.name == "王伟"
    assert not message.HasField("gender")
    assert not message.members[0].HasField("resident_id")


def test_from_dict_into_a_filled_message_is_parse_dict() -> None:
    """A message that already holds fields is merged into exactly as ParseDict merges."""
    data = {"holdings": [{"address": "广州市天河区", "co_owner_names": ["陈静"]}]}
    ours, theirs = records_pb2.PropertyRecord(), records_pb2.PropertyRecord()
    for message in (ours, theirs):
        message.holdings.add(address="old", area_sqm=12.5)
    fields.from_dict(data, ours)
    json_format.ParseDict(data, theirs)
    assert ours == theirs
