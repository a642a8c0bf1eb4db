"""The broker's gRPC server: wiring, start and stop (``app``); how each call is error-mapped,
counted and logged (``calls``); who may bind the port (``ports``); and ``serve --workers``
(``workers``, ``worker_process``)."""
