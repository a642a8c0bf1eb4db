"""Signed evidence documents (调取凭证): what the broker released, to whom, for which case,
provable years later without the audit log holding the data (docs/evidence.md).

- :mod:`~certbroker.evidence.jws`: the envelope, a JWS compact serialization signed with EdDSA
  (Ed25519), and the canonical JSON every digest is taken over.
- :mod:`~certbroker.evidence.keys`: the evidence key ring (``<state_dir>/evidence-keys``), its
  rotation and its JWKS.
- :mod:`~certbroker.evidence.document`: the salted content digests the audit entry records and
  the evidence payload the broker signs.
- :mod:`~certbroker.evidence.verify`: offline verification (no broker, no database) with
  distinct exit codes; :mod:`~certbroker.evidence.pdf`: the printable A4 page with its QR code.
"""
