"""certbroker: a gRPC broker for "one window" (一窗受理) service-hall counters.

An authorized window clerk pulls a citizen's records from the departments, for one matter and
one case; every lookup is authorized by declarative policy, minimized, and audited in a
tamper-evident log before the answer leaves. One subpackage per concern (layers, top to bottom,
enforced by import-linter): ``cli``, ``server``, ``lookup``, ``routing``, ``audit``, ``policy``,
``auth``, over the foundation modules (``errors``, ``ids``, ``validation``, ``config``,
``metrics``, ``cache``), the contract helpers (``contract``) and the generated code (``v1``).
Department adapters (``adapters``) see only the contract and their SDK.

This module imports nothing: importing any part of the package stays cheap.
"""
