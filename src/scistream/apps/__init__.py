"""Bundled demo applications: a producer of a deterministic byte stream and a consumer
that verifies every byte of it."""
