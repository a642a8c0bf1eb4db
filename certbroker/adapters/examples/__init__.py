"""Example department adapters written against the SDK, short enough to copy."""
