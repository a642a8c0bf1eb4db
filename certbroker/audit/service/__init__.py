"""The auditor's side of the broker: the ``certbroker.v1.Audit`` servicer
(:mod:`~certbroker.audit.service.servicer`), its proof and export requests
(:mod:`~certbroker.audit.service.proofs`) and the messages it answers with
(:mod:`~certbroker.audit.service.messages`)."""
