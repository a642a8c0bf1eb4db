"""A hostile department adapter: a real gRPC server process that answers ``Fetch`` as told.

    python -m tests.routing.hostile_adapter --control FILE [--port P]

It serves ``certbroker.v1.DepartmentAdapter/Fetch`` through a raw handler (the reply is bytes
it builds itself, so it can send what no well-behaved adapter would) and reads ``FILE`` (JSON)
on every call to decide how to answer::

    {"mode": "ok"}                                    a well-formed reply (marriage or property)
    {"mode": "unknown_fields"}                        ... with fields the contract does not know
    {"mode": "wrong_subject"} / {"mode": "no_echo"}   another citizen's subject echoed / none
    {"mode": "long_string", "size": N}                registration_office of N characters
    {"mode": "many_items", "count": N}                N property holdings
    {"mode": "big_record", "count": N, "size": S}     N holdings, each with an S-char address
    {"mode": "corrupt"}                               bytes that are not a FetchResponse
    {"mode": "slow", "delay_s": S}                    a well-formed reply after S seconds
    {"mode": "error", "code": C, "reason": R, "message": M}   a rich error status
    {"mode": "bad_as_of"} / {"mode": "no_as_of"}      an out-of-range as_of / none

Prints ``READY port=<N>`` once serving (as the demo adapters do) and one ``fetch mode=<M>`` line
per call on stderr, so a test can count the calls that reached it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from certbroker.contract import resident_id
from certbroker.v1 import adapter_pb2, records_pb2

SERVICE = "certbroker.v1.DepartmentAdapter"
#: A marker in every smuggled (unknown) field: a test looks for it in what the clerk got.
SMUGGLED = b"SMUGGLED-BY-THE-ADAPTER"
#: Another citizen: the subject a "wrong_subject" reply claims to be about.
OTHER_SUBJECT = resident_id.make("440105", dt.date(1970, 1, 1), 17)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def unknown_field(number: int, payload: bytes = SMUGGLED) -> bytes:
    """A length-delimited field ``number`` (unknown to the contract) holding ``payload``."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _marriage(control: dict[str, Any]) -> records_pb2.MarriageRecord:
    office = "广州市海珠区民政局"
    if control["mode"] == "long_string":
        office = "登" * int(control["size"])
    return records_pb2.MarriageRecord(
        marital_status="已婚",
        spouse_name="王芳",
        spouse_resident_id=resident_id.make("440105", dt.date(1980, 5, 17), 24),
        registered_on="2010-10-10",
        registration_office=office,
        certificate_number="J440105-2010-001234",
    )


def _holding(address: str = "广州市海珠区新港中路1号") -> records_pb2.PropertyHolding:
    return records_pb2.PropertyHolding(
        certificate_number="粤(2020)广州市不动产权第0000001号",
        address=address,
        usage="住宅",
        area_sqm=88.5,
        ownership="单独所有",
        registered_on="2020-01-01",
        mortgaged=False,
        seized=False,
    )


def record_bytes(record_type: str, control: dict[str, Any]) -> bytes:
    """The ``Record`` the reply carries, as bytes (unknown fields spliced in where asked)."""
    mode = control["mode"]
    smuggle = mode == "unknown_fields"
    if record_type == "property":
        count = int(control.get("count", 1))
        address = "址" * int(control["size"]) if mode == "big_record" else None
        holdings = [_holding(address) if address else _holding() for _ in range(count)]
        inner = b""
        for holding in holdings:  # each holding smuggles a field of its own: nested unknowns
            body = holding.SerializeToString() + (unknown_field(99) if smuggle else b"")
            inner += unknown_field(1, body)  # PropertyRecord.holdings = 1
        inner += unknown_field(77) if smuggle else b""
        number = 3  # Record.property
    else:
        inner = _marriage(control).SerializeToString() + (unknown_field(99) if smuggle else b"")
        number = 4  # Record.marriage
    return unknown_field(number, inner) + (unknown_field(15) if smuggle else b"")


def reply_bytes(request: adapter_pb2.FetchRequest, control: dict[str, Any]) -> bytes:
    """The whole FetchResponse as bytes."""
    mode = control["mode"]
    if mode == "corrupt":
        return b"\x0a\xff\xff\xff\xff\x0f\x00garbage"  # a length running past the end
    as_of = timestamp_pb2.Timestamp()
    as_of.FromDatetime(dt.datetime.now(dt.UTC))
    if mode == "bad_as_of":
        as_of.seconds = 10**15  # far beyond year 9999: not a valid Timestamp
    subject = {"wrong_subject": OTHER_SUBJECT, "no_echo": ""}.get(mode, request.subject_id)
    response = adapter_pb2.FetchResponse(department="civil_affairs", subject_id=subject)
    if mode != "no_as_of":
        response.as_of.CopyFrom(as_of)
    out = response.SerializeToString() + unknown_field(
        1, record_bytes(request.record_type, control)
    )
    return out + (unknown_field(50) if mode == "unknown_fields" else b"")


class Hostile:
    """The Fetch behaviour, steered by the control file."""

    def __init__(self, control: Path) -> None:
        self._control = control

    async def fetch(self, request: adapter_pb2.FetchRequest, context: Any) -> bytes:
        control = json.loads(self._control.read_text())
        mode = control["mode"]
        print(f"fetch mode={mode} record_type={request.record_type}", file=sys.stderr, flush=True)
        if mode == "slow":
            await asyncio.sleep(float(control["delay_s"]))
        if mode == "error":
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason=control["reason"], domain="certbroker"))
            code = grpc.StatusCode[control["code"]]
            status = status_pb2.Status(
                code=code.value[0], message=control["message"], details=[detail]
            )
            await context.abort_with_status(rpc_status.to_status(status))
        return reply_bytes(request, control)


async def serve(control: Path, port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Fetch": grpc.unary_unary_rpc_method_handler(
                Hostile(control).fetch,
                request_deserializer=adapter_pb2.FetchRequest.FromString,
                response_serializer=None,  # the behaviour returns the reply's bytes itself
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY port={bound}", flush=True)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.routing.hostile_adapter")
    parser.add_argument("--control", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.control, args.port))


if __name__ == "__main__":
    main()
