"""The adapter SDK: what a department writes (an :class:`Adapter`) and what it gets for free.

A department implements one small class per record type it serves: ``fetch(subject_id,
fields)`` returns a plain dict shaped like the record message (protobuf JSON field names, e.g.
``{"name": "王伟", "members": [{"name": ...}]}``) and raises :class:`RecordNotFound` for a citizen
it does not know. It may return more than was asked: the SDK turns the dict into the typed
message and drops every field that was not asked for (:func:`to_record`), so no adapter can leak
a field the broker's decision did not allow.

The same adapter object then runs either in the broker's process (:func:`fetch_record`) or as
the department's own gRPC server. ``sdk.main(build)`` gives it a whole process (see
``certbroker/adapters/examples/hukou_minimal.py``, about 30 lines):

* verification of the broker's decision token on every call, and filtering to its fields
  (:class:`DecisionTokenVerifier`, ``--broker-public-key``);
* health, request validation, rich error statuses, ``as_of``/``department``
  (:class:`AdapterService`, :func:`serve`);
* registration and heartbeats with the broker's Registry (:class:`Registration`, ``--register``);
* TLS and mutual TLS (:func:`server_credentials`, ``--tls-cert``/``--tls-key``/``--tls-client-ca``);
* Prometheus metrics (:class:`AdapterMetrics`, ``--metrics-port``).

The parts live in the modules of this package (``core``, ``token``, ``service``, ``registry``,
``app``, ``metrics``); import them from here.
"""

from __future__ import annotations

from certbroker.adapters.sdk.app import (
    GRACE_SECONDS,
    AdapterServer,
    ServeOptions,
    add_arguments,
    close_adapters,
    main,
    options_from_args,
)
from certbroker.adapters.sdk.core import (
    DOMAIN,
    Adapter,
    AdapterError,
    InvalidRequest,
    RecordNotFound,
    SqliteSource,
    check_fields,
    fetch_record,
    rich_status,
    schema_of,
    to_record,
)
from certbroker.adapters.sdk.metrics import AdapterMetrics
from certbroker.adapters.sdk.registry import (
    SCHEMA_VERSION,
    Registration,
    RegistrationConfig,
    RegistrationError,
)
from certbroker.adapters.sdk.service import SERVICE_NAME, AdapterService, serve, server_credentials
from certbroker.adapters.sdk.token import (
    METADATA_KEY,
    Decision,
    DecisionTokenInvalid,
    DecisionTokenMismatch,
    DecisionTokenMissing,
    DecisionTokenVerifier,
    load_public_key,
    thumbprint,
)

__all__ = [
    "DOMAIN",
    "GRACE_SECONDS",
    "METADATA_KEY",
    "SCHEMA_VERSION",
    "SERVICE_NAME",
    "Adapter",
    "AdapterError",
    "AdapterMetrics",
    "AdapterServer",
    "AdapterService",
    "Decision",
    "DecisionTokenInvalid",
    "DecisionTokenMismatch",
    "DecisionTokenMissing",
    "DecisionTokenVerifier",
    "InvalidRequest",
    "RecordNotFound",
    "Registration",
    "RegistrationConfig",
    "RegistrationError",
    "ServeOptions",
    "SqliteSource",
    "add_arguments",
    "check_fields",
    "close_adapters",
    "fetch_record",
    "load_public_key",
    "main",
    "options_from_args",
    "rich_status",
    "schema_of",
    "serve",
    "server_credentials",
    "thumbprint",
    "to_record",
]
