"""A cluster as deployed: PostgreSQL, two ``certbroker serve`` processes, nginx in front.

Real parts only: the PostgreSQL server (a fresh schema), two broker processes sharing it (and
the keys a cluster shares: the IdP's, the decision key, the checkpoint key), nginx proxying
gRPC to both (:mod:`tests.cluster.nginx`), and an adapter process that registers through
nginx. One test walks the whole story, in order, because its last step kills a broker:

1. the adapter registers through nginx; both brokers know it, and lookups through nginx are
   answered by both (nginx's access log names the broker of each call);
2. a clerk disabled through broker A is refused on the next call at broker B, and enabled
   again through B is served on the next call at A;
3. a citizen frozen through nginx is frozen at both brokers;
4. ``kill -9`` of the broker that signs checkpoints: calls through nginx go on succeeding at
   the other, which takes over signing; every receipt a client received is in the one shared
   log, which verifies (chain, tree and the checkpoints' signatures).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from certbroker.adapters.demo import synthetic
from certbroker.audit import QueryFilter, query
from certbroker.audit.integrity import proofs
from certbroker.audit.verify.chain import verify
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.cluster.lease import signer_of
from certbroker.cluster.pg import ClusterDb
from certbroker.config import PostgresLocation
from certbroker.routing.decision_token import DecisionSigner
from certbroker.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.audit.pg_support import fresh_schema
from tests.cluster.nginx import Nginx, require_nginx
from tests.helpers import ROOT, start_process
from tests.server.serving import Serve, serve, wait_until

pytestmark = pytest.mark.postgres

MATTER = "BDC-ZY-001"  # property transfer: household among its records, any hour in a 24h hall
OFFICE = "gz-haizhu-24h-01"
WHY = admin_pb2.Justification(reason="cluster test", ticket="SEC-2026-0001")
CHECKPOINT_S = 0.5  # short, so that the takeover is quick


@pytest.fixture
def pg() -> Iterator[PostgresLocation]:
    with fresh_schema() as location:
        yield location


def broker_config(tmp_path: Path, pg: PostgresLocation) -> Path:
    """The brokers' one configuration file: the shared PostgreSQL, the shared checkpoint key,
    household routed to registered adapters."""
    path = tmp_path / "broker.toml"
    path.write_text(
        "[server]\nport = 0\nmetrics_port = 0\nshutdown_grace_s = 1\n"
        f"[audit]\ndsn = {pg.dsn!r}\nschema = {pg.schema!r}\n"
        f'checkpoint_key = "{tmp_path / "checkpoint.pem"}"\n'
        f"checkpoint_interval_s = {CHECKPOINT_S}\n"
        '[adapters.household]\nmode = "registry"\n'
    )
    return path


def start_broker(tmp_path: Path, dataset_dir: Path, keys: Path, config: Path, name: str) -> Serve:
    state = tmp_path / name
    # The keys every broker of a cluster shares (docs/cluster.md): the token issuer's (here the
    # development IdP's) and the decision-token key the adapters check.
    for shared in ("idp", "broker-key"):
        shutil.copytree(keys / shared, state / shared)
    return serve(tmp_path, dataset_dir, "--config", str(config), name=name, state_dir=state)


class Clerk:
    """Calls as one clerk (or officer) to one target."""

    def __init__(self, target: str, token: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.md = client.bearer(token)
        self.broker = broker_pb2_grpc.CertificateBrokerStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryStub(self.channel)

    def lookup(self, subject: str, case: str) -> Any:
        request = client.lookup_request("household", subject, MATTER, case)
        return self.broker.Lookup(request, metadata=self.md, timeout=30)

    def refused(self, subject: str, case: str) -> tuple[str, str]:
        with pytest.raises(grpc.RpcError) as info:
            self.lookup(subject, case)
        error = client.call_error(info.value)
        return error.code, error.reason

    def instances(self) -> list[str]:
        reply = self.registry.ListAdapters(
            registry_pb2.ListAdaptersRequest(), metadata=self.md, timeout=30
        )
        return [i.endpoint for i in reply.adapters if i.live]

    def close(self) -> None:
        self.channel.close()


def test_two_brokers_behind_nginx_share_registry_controls_log_and_signing(
    pg: PostgresLocation, tmp_path: Path, dataset_dir: Path
) -> None:
    require_nginx()
    keys = tmp_path / "keys"
    idp = DevIdentityProvider(keys)
    DecisionSigner(keys)
    checkpoint_key = proofs.CheckpointSigner.load(tmp_path, tmp_path / "checkpoint.pem")
    config = broker_config(tmp_path, pg)
    credential = tmp_path / "dept.jwt"
    credential.write_text(idp.issue_department("public_security"))
    subject, other = synthetic.sample_couple(dataset_dir)
    clerk_token = idp.issue("clerk-7", ("window_clerk",), OFFICE)
    officer_token = idp.issue("sec-1", ("security_officer",), "security-office")
    operator = idp.issue_operator("ops-1")
    receipts: list[str] = []
    cases = iter(f"GZ20261203-{n:06d}" for n in range(1, 10_000))
    codes: dict[int, int] = {}  # exit status by pid, once stopped

    def served(clerk: Clerk, who: str = subject) -> None:
        reply = clerk.lookup(who, next(cases))
        assert reply.record.household.name
        receipts.append(reply.receipt.entry_id)

    with contextlib.ExitStack() as stack:  # whatever started is stopped, in reverse order
        brokers: list[Serve] = []
        for name in ("a", "b"):
            broker = start_broker(tmp_path, dataset_dir, keys, config, name)
            brokers.append(broker)
            stack.callback(lambda s=broker: codes.__setitem__(s.proc.pid, s.stop()))
        a, b = brokers
        nginx = Nginx(tmp_path / "nginx", [a.target, b.target])
        stack.callback(nginx.stop)
        adapter = start_process(
            [
                *("-m", "certbroker.adapters.examples.hukou_minimal", "--port", "0"),
                *("--db", str(synthetic.dataset_path(dataset_dir, "household"))),
                *("--broker-public-key", str(keys / "broker-key" / "public-key.pem")),
                *("--register", nginx.target, "--credential-file", str(credential)),
            ],
            tmp_path / "adapter.log",
            "household",
        )
        stack.callback(adapter.stop)
        targets = {"a": a.target, "b": b.target, "nginx": nginx.target}
        via = {name: Clerk(target, clerk_token) for name, target in targets.items()}
        officer = {name: Clerk(target, officer_token) for name, target in targets.items()}
        for clerk in (*via.values(), *officer.values()):
            stack.callback(clerk.close)

        # 1. Registered through nginx (before the adapter's READY): both brokers route to it.
        endpoint = f"127.0.0.1:{adapter.port}"
        for broker in brokers:
            listing = stack.enter_context(contextlib.closing(Clerk(broker.target, operator)))
            assert listing.instances() == [endpoint], broker.target
        for _ in range(8):
            served(via["nginx"])
        lookups = [u for _, u, uri in nginx.access() if uri.endswith("/Lookup")]
        assert set(lookups) == {a.target, b.target}  # both brokers answered lookups

        # 2. Disabled through A: refused on the very next call at B (and at A); enabled again
        # through B: served on the very next call at A.
        officer["a"].admin.DisableClerk(
            admin_pb2.DisableClerkRequest(sub="clerk-7", why=WHY), metadata=officer["a"].md
        )
        assert via["b"].refused(subject, next(cases)) == ("PERMISSION_DENIED", "CLERK_DISABLED")
        assert via["a"].refused(subject, next(cases)) == ("PERMISSION_DENIED", "CLERK_DISABLED")
        officer["b"].admin.EnableClerk(
            admin_pb2.EnableClerkRequest(sub="clerk-7", why=WHY), metadata=officer["b"].md
        )
        served(via["a"])
        served(via["b"])

        # 3. Frozen through nginx: frozen at both brokers; the other spouse is still served.
        officer["nginx"].admin.FreezeSubject(
            admin_pb2.FreezeSubjectRequest(subject_id=subject, why=WHY),
            metadata=officer["nginx"].md,
        )
        for name in ("a", "b", "a", "b"):
            assert via[name].refused(subject, next(cases)) == (
                "PERMISSION_DENIED",
                "SUBJECT_FROZEN",
            )
        served(via["a"], other)
        served(via["b"], other)

        # 4. kill -9 of the checkpoint signer: nginx passes every call to the survivor, which
        # takes over signing.
        db = ClusterDb(pg, "test")
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            wait_until("a checkpoint signer", lambda: signer_of(conn, db) is not None)
            holder = signer_of(conn, db) or ""
            victim, survivor = (a, b) if f":{a.proc.pid}" in holder else (b, a)
            assert f":{victim.proc.pid}" in holder
            victim.proc.send_signal(signal.SIGKILL)
            victim.wait()
            for _ in range(6):
                served(via["nginx"], other)
            wait_until(
                "the survivor to sign",
                lambda: f":{survivor.proc.pid}" in (signer_of(conn, db) or ""),
            )
        after_kill = [u for _, u, uri in nginx.access()[-6:] if uri.endswith("/Lookup")]
        assert after_kill
        assert all(u.endswith(survivor.target) for u in after_kill), after_kill
        # The survivor signs the log including the calls made after the kill.
        total = len(query(pg, QueryFilter(limit=100_000)))
        wait_until(
            "a checkpoint over the whole log",
            lambda: (c := proofs.latest_checkpoint(pg)) is not None and c.size >= total,
        )
    assert codes[survivor.proc.pid] == 0, survivor.stderr[-3000:]

    # Every receipt a client received is in the one shared log, which verifies.
    entries = query(pg, QueryFilter(limit=100_000))
    assert set(receipts) <= {e.entry_id for e in entries}
    assert len(receipts) == 8 + 2 + 2 + 6
    report = verify(pg)
    assert report.ok, report
    where = ["--dsn", pg.dsn, "--schema", pg.schema]
    out = subprocess.run(
        [
            *(sys.executable, "-m", "certbroker", "audit", "verify", *where),
            *("--public-key", str(checkpoint_key.public_key_path)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
