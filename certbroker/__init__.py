"""The certbroker contract: generated protobuf and gRPC code lives in certbroker.v1."""
