"""The ``certbroker`` command line (:mod:`~certbroker.cli.main`), one module per command group.

``serve``/``demo``/``lookup``/``token``/``policy`` live in :mod:`~certbroker.cli.main`;
``adapters`` in :mod:`~certbroker.cli.adapters`; the log's integrity commands (``audit
verify|export|checkpoint|archive|pg-grants``) in :mod:`~certbroker.cli.audit_log`; the
auditor's calls to the broker (``audit report|anomalies|prove``) in
:mod:`~certbroker.cli.auditor`. :mod:`~certbroker.cli.client` is the small gRPC client they and
the demo (:mod:`~certbroker.cli.demo`) share; :mod:`~certbroker.cli.table` renders terminal
tables. This is the top layer: nothing in the broker imports it.
"""
