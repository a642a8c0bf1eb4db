"""Department side of certbroker: the adapter SDK, the four demo department adapters, the
generic SQL adapter (:mod:`certbroker.adapters.sql`) and examples
(:mod:`certbroker.adapters.examples`).

Code here imports only the standard library, grpc/protobuf, PyJWT/cryptography,
prometheus-client, the ``certbroker`` contract and ``adapters.*`` (psycopg, optionally, for the
SQL adapter's PostgreSQL) -- never ``broker``: a department must be able to run its adapter
without the broker's code.
"""
