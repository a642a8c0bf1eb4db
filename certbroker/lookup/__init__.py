"""The clerk's side of the broker: ``certbroker.v1.CertificateBroker`` (Lookup, LookupMatter,
ListMatters) in :mod:`~certbroker.lookup.servicer`, the per-item decide/fetch/minimize steps in
:mod:`~certbroker.lookup.pipeline` and matter bundles in :mod:`~certbroker.lookup.bundle`."""
