"""A cluster of brokers: what several brokers must agree on, in PostgreSQL.

With ``[audit] dsn`` set, the audit log is already shared; this package puts the rest there
too: the security officers' controls (:mod:`~certbroker.cluster.controls`), the adapter
registry (:mod:`~certbroker.cluster.registry`), each broker following the others' changes
(:mod:`~certbroker.cluster.follow`: LISTEN/NOTIFY, with a re-read every second as the
fallback) and the one broker that signs checkpoints (:mod:`~certbroker.cluster.lease`).
:func:`certbroker.cluster.shared.shared_state_for` chooses, from the configuration, between
these and the embedded single-broker stores (SQLite files in the state dir). See
``docs/cluster.md``.

The package sits above :mod:`certbroker.admin`, :mod:`certbroker.routing` and
:mod:`certbroker.auth`, whose plug points (``ControlStore``, ``RegistryBackend``) it
implements, and below :mod:`certbroker.server`, which wires it.
"""
