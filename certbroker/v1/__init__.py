"""Generated from proto/certbroker/v1 by scripts/protogen.py. Do not edit."""
