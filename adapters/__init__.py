"""Department side of certbroker: the adapter SDK and the four demo department adapters.

Code here imports only the standard library, grpc/protobuf, the ``certbroker`` contract and
``adapters.sdk`` -- never ``broker``: a department must be able to run its adapter without the
broker's code.
"""
