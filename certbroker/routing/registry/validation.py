"""Input validation for Registry calls: department ids, record types, endpoints, instance ids.

Every failure is ``InvalidArgument`` with a reason and the argument's name, never the value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from certbroker import validation
from certbroker.auth.authenticator import DEPARTMENT_ID
from certbroker.contract.fields import RECORD_TYPES
from certbroker.contract.generic import NAME
from certbroker.errors import InvalidArgument

#: The contract versions this broker speaks (``RegisterRequest.schema_version``).
SCHEMA_VERSIONS = ("certbroker.v1",)
#: Longest accepted value per argument (characters). 253 is the longest DNS name.
LIMITS = {"department": 64, "endpoint": 253 + 6, "schema_version": 32, "instance_id": 32}
_INSTANCE_ID = re.compile(r"[0-9a-f]{32}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # no IGNORECASE: it matches "K" (Kelvin)
_PORT = re.compile(r"[1-9][0-9]{0,4}")


def _text(name: str, value: str, *, required: bool = True) -> str:
    return validation.text(name, value, required=required, limit=LIMITS[name])


def department(value: str, *, required: bool = True) -> str:
    """A department id as the policy catalogue spells them (``civil_affairs``)."""
    if _text("department", value, required=required) and not DEPARTMENT_ID.fullmatch(value):
        raise InvalidArgument(
            "BAD_DEPARTMENT", "department is not a department id", argument="department"
        )
    return value


def record_types(values: Sequence[str]) -> tuple[str, ...]:
    """At least one record type, none twice: each one of the contract, or a name a catalogue
    may declare (``[a-z][a-z0-9_]*``; the servicer then checks the policy in force knows it)."""
    if not values:
        raise InvalidArgument(
            "MISSING_ARGUMENT", "record_types needs at least one", argument="record_types"
        )
    if any(v not in RECORD_TYPES and NAME.fullmatch(v) is None for v in values):
        raise InvalidArgument(
            "UNKNOWN_RECORD_TYPE",
            f"record_types: each must be one of {', '.join(RECORD_TYPES)} or a declared type",
            argument="record_types",
        )
    if len(set(values)) != len(values):
        raise InvalidArgument(
            "DUPLICATE_RECORD_TYPE", "record_types lists one twice", argument="record_types"
        )
    return tuple(values)


def endpoint(value: str) -> str:
    """``host:port`` the broker can dial: a DNS name, an IPv4 address or ``[IPv6]``, and a
    port 1..65535. No scheme, path or unspecified address (0.0.0.0 / [::] name no host)."""
    _text("endpoint", value)
    parse_endpoint(value)
    return value


def parse_endpoint(
    value: str,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | str, int]:
    """``host:port`` as (address, or lowercase DNS name; port): what the department catalogue's
    ``endpoints`` are matched against. ``InvalidArgument`` as :func:`endpoint` raises it."""
    host, port = _split(value)
    if host is None or not _PORT.fullmatch(port) or int(port) > 65535:
        raise InvalidArgument(
            "BAD_ENDPOINT", "endpoint must be host:port (port 1..65535)", argument="endpoint"
        )
    if isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address) and (
        host.is_unspecified or host.is_multicast
    ):
        raise InvalidArgument(
            "BAD_ENDPOINT", "endpoint must name a reachable host", argument="endpoint"
        )
    return (host.lower() if isinstance(host, str) else host), int(port)


def _split(value: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | str | None, str]:
    if value.startswith("["):
        inner, sep, port = value[1:].partition("]:")
        try:
            return (ipaddress.IPv6Address(inner) if sep else None), port
        except ValueError:
            return None, port
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        return None, port
    try:
        return ipaddress.IPv4Address(host), port
    except ValueError:
        pass
    labels = host.split(".")
    # A name, not a number: an all-numeric "host" would be a malformed IPv4 address.
    if all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit():
        return host, port
    return None, port


def schema_version(value: str) -> str:
    """One of :data:`SCHEMA_VERSIONS`."""
    if _text("schema_version", value) not in SCHEMA_VERSIONS:
        raise InvalidArgument(
            "UNSUPPORTED_SCHEMA_VERSION",
            f"schema_version must be one of {', '.join(SCHEMA_VERSIONS)}",
            argument="schema_version",
        )
    return value


def instance_id(value: str) -> str:
    """An instance id as ``Register`` hands them out: 32 lowercase hex digits."""
    if not _INSTANCE_ID.fullmatch(_text("instance_id", value)):
        raise InvalidArgument(
            "BAD_INSTANCE_ID", "instance_id is not an instance id", argument="instance_id"
        )
    return value
