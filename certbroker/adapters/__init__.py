"""Department side of certbroker: the adapter SDK, the four demo department adapters, the
generic SQL adapter (:mod:`certbroker.adapters.sql`) and examples
(:mod:`certbroker.adapters.examples`).

Code here imports only the standard library, grpc/protobuf, PyJWT/cryptography,
prometheus-client, the contract (``certbroker.v1``, ``certbroker.contract``) and
``certbroker.adapters.*`` (psycopg, optionally, for the SQL adapter's PostgreSQL) -- never the
broker's own packages (an import-linter contract in ``pyproject.toml``): a department must be
able to run its adapter without the broker's code.
"""
