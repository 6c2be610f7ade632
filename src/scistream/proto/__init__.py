"""Generated protobuf/gRPC code for the SciStream control protocol.

Regenerate with ``python scripts/genproto.py``; see scistream.proto for the contract.
"""
from . import scistream_pb2 as pb
from . import scistream_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
