"""The control server (S2CS): sessions, ports, bandwidth, and the gRPC service."""
