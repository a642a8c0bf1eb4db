"""The ``certbroker.v1.Admin`` service: security officers stop a misuse now."""
