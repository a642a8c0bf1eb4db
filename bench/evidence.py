"""Scenario "Evidence documents": what a signed evidence document adds to a lookup.

A broker process (``certbroker serve``, shipped policies, in-process demo departments, SQLite
audit log) answers one clerk, in rounds, a single ``Lookup`` (marriage) and a ``LookupMatter``
(the property transfer for a couple: 6 records), each with and without ``evidence``; the order
rotates every round. With evidence the broker also salts and digests every released record
(the digest goes into its audit entry) and signs one JWS (Ed25519) after the entries are
written. Every evidence reply is checked (an empty document fails the run). Also measured in
process, without gRPC, on the documents received: the digests and the signature (what issuing
adds, :mod:`certbroker.evidence.document`) and offline verification
(:mod:`certbroker.evidence.verify`).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.bundle import rotating_rounds
from bench.harness import BenchError, Options, Processes, Result, percentile
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.evidence import document, jws, keys
from certbroker.evidence import verify as evidence_verify
from certbroker.v1 import broker_pb2_grpc

SECTION = "Evidence documents"
MATTER = "BDC-ZY-001"
CASE = "GZ20261121-009998"
OFFICE = "gz-haizhu-24h-01"
CITIZENS = 300


def run(options: Options) -> Result:
    """Start the broker, measure, and report (see the module docstring)."""
    rounds = options.count(full=200, smoke=3)
    warmup = 1 if options.smoke else 10
    with tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp:
        base = Path(tmp)
        datasets = base / "datasets"
        synthetic.generate(datasets, citizens=CITIZENS)
        couple = synthetic.sample_couple(datasets)
        state = base / "state"
        with Processes(base) as processes:
            serve = ["-m", "certbroker", "serve", "--port", "0", "--metrics-port", "0"]
            serve += ["--state-dir", str(state)]
            env = {"CERTBROKER_DATASET_DIR": str(datasets)}
            broker = processes.start({"broker": serve}, env=env)["broker"]
            token = DevIdentityProvider(state).issue("bench-clerk", ["window_clerk"], OFFICE)
            samples, documents = _measure(f"127.0.0.1:{broker.port}", token, couple, rounds, warmup)
        jwks = keys.public_keys(keys.jwks_text(state))
    key = Ed25519PrivateKey.generate()
    signing = {
        f"digest + sign in process ({items} records)": _time(
            functools.partial(_digest_and_sign, jws.parse(doc).payload, key), rounds
        )
        for items, doc in sorted(documents.items())
    }
    offline = signing | {
        f"verify offline ({items} records)": _time(
            functools.partial(evidence_verify.verify, doc.encode(), jwks), rounds
        )
        for items, doc in sorted(documents.items())
    }
    return _result(samples, offline, documents, rounds)


def _digest_and_sign(payload: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """What issuing costs the broker beyond the lookup: every item's salted digests, then the
    signature over the canonical payload."""
    for item in payload["items"]:
        document.content_digest(document.field_digests(os.urandom(16), item["content"]))
    return jws.sign(payload, key, "bench")


def _time(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def _measure(
    target: str, token: str, couple: tuple[str, str], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[int, str]]:
    """Milliseconds per call name; one evidence document per kind of call (by item count)."""
    metadata = client.bearer(token)
    seller, spouse = couple
    documents: dict[int, str] = {}
    with grpc.insecure_channel(target) as channel:
        stub = broker_pb2_grpc.CertificateBrokerStub(channel)

        def lookup(evidence: bool) -> None:
            request = client.lookup_request("marriage", seller, MATTER, CASE)
            request.evidence = evidence
            _check(
                stub.Lookup(request, metadata=metadata, timeout=10).evidence, evidence, documents
            )

        def bundle(evidence: bool) -> None:
            request = client.lookup_matter_request(
                MATTER, CASE, [(seller, "seller"), (spouse, "co_owner")]
            )
            request.evidence = evidence
            reply = stub.LookupMatter(request, metadata=metadata, timeout=10)
            _check(reply.evidence, evidence, documents)

        calls: dict[str, Callable[[], object]] = {
            "Lookup": functools.partial(lookup, False),
            "Lookup + evidence": functools.partial(lookup, True),
            "LookupMatter (6 records)": functools.partial(bundle, False),
            "LookupMatter (6 records) + evidence": functools.partial(bundle, True),
        }
        samples = rotating_rounds(calls, rounds, warmup)
    return samples, documents


def _check(document: str, asked: bool, documents: dict[int, str]) -> None:
    if bool(document) != asked:
        raise BenchError(f"evidence {'missing' if asked else 'unasked for'} in a reply")
    if document:
        documents[len(jws.parse(document).payload["items"])] = document


def _result(
    samples: dict[str, list[float]],
    offline: dict[str, list[float]],
    documents: dict[int, str],
    rounds: int,
) -> Result:
    p50 = {name: percentile(values, 50) for name, values in {**samples, **offline}.items()}
    rows = [
        (name, f"{p50[name]:.2f}", f"{percentile(values, 90):.2f}", str(len(values)))
        for name, values in {**samples, **offline}.items()
    ]
    extra = {
        name: p50[f"{name} + evidence"] - p50[name]
        for name in ("Lookup", "LookupMatter (6 records)")
    }
    sizes = ", ".join(f"{n} records: {len(d)} bytes" for n, d in sorted(documents.items()))
    return Result(
        section=SECTION,
        setup=(
            "A `certbroker serve` process (shipped policies: household and marriage records "
            "cached; in-process demo departments; SQLite audit log) and one clerk; "
            f"{rounds} rounds, each call once per round in rotating order; offline "
            f"verification in process. Evidence sizes: {sizes}."
        ),
        header=("call", "p50 ms", "p90 ms", "calls"),
        rows=rows,
        verdict=(
            "evidence adds (p50) "
            + ", ".join(f"{extra[name]:.2f} ms to a {name}" for name in extra)
        ),
    )
