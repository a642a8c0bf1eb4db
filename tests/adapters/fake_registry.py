"""A stand-in for the broker's Registry, recording what adapters send it.

A plain (threaded) gRPC server, so it serves adapters in the test's own event loop and adapter
processes alike. The real Registry is the broker's business and tested there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from certbroker.v1 import registry_pb2, registry_pb2_grpc


@dataclass(frozen=True)
class Call:
    method: str
    request: Any
    authorization: str


class FakeRegistry(registry_pb2_grpc.RegistryServicer):
    """Registers anything (unless told to refuse), forgets on demand."""

    def __init__(self, port: int = 0, lease_s: int = 15) -> None:
        self.lease_s = lease_s
        self.refuse: grpc.StatusCode | None = None
        self.calls: list[Call] = []
        self.instances: dict[str, registry_pb2.RegisterRequest] = {}
        self._lock = threading.Condition()
        self._next = 0
        self._server = grpc.server(ThreadPoolExecutor(4))
        registry_pb2_grpc.add_RegistryServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(0).wait(5)

    def _record(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        with self._lock:
            self.calls.append(Call(method, request, str(auth)))
            self._lock.notify_all()

    def Register(
        self, request: registry_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> registry_pb2.RegisterResponse:
        self._record("Register", request, context)
        if self.refuse is not None:
            context.abort(self.refuse, "refused by the fake registry")
        with self._lock:
            self._next += 1
            instance_id = f"inst-{self._next}"
            self.instances[instance_id] = request
        return registry_pb2.RegisterResponse(instance_id=instance_id, lease_seconds=self.lease_s)

    def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> registry_pb2.HeartbeatResponse:
        self._record("Heartbeat", request, context)
        if request.instance_id not in self.instances:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown instance")
        return registry_pb2.HeartbeatResponse(lease_seconds=self.lease_s)

    def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: grpc.ServicerContext
    ) -> registry_pb2.DeregisterResponse:
        self._record("Deregister", request, context)
        with self._lock:
            self.instances.pop(request.instance_id, None)
        return registry_pb2.DeregisterResponse()

    def forget(self) -> None:
        """Lose every registration, as a broker that lost its state would."""
        with self._lock:
            self.instances.clear()

    def methods(self) -> list[str]:
        with self._lock:
            return [c.method for c in self.calls]

    def wait_for(self, predicate: Callable[[list[Call]], bool], timeout: float = 10) -> None:
        """Block until ``predicate(calls)`` holds (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self.calls):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; calls so far: {[c.method for c in self.calls]}"
                self._lock.wait(left)
