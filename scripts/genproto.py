#!/usr/bin/env python3
"""Regenerate src/scistream/proto/scistream_pb2*.py from scistream.proto.

    python scripts/genproto.py

Needs grpcio-tools (pip install -e '.[dev]'). The generated files are committed so
that installing scistream needs no code generator.
"""
import pathlib
import re
import sys

from grpc_tools import protoc

root = pathlib.Path(__file__).resolve().parent.parent
proto_dir = root / "src" / "scistream" / "proto"
rc = protoc.main([
    "grpc_tools.protoc",
    f"-I{proto_dir}",
    f"--python_out={proto_dir}",
    f"--pyi_out={proto_dir}",
    f"--grpc_python_out={proto_dir}",
    str(proto_dir / "scistream.proto"),
])
if rc:
    sys.exit(rc)
# grpc_tools emits an absolute import; make it package-relative.
grpc_file = proto_dir / "scistream_pb2_grpc.py"
text = grpc_file.read_text()
text = re.sub(r"^import scistream_pb2 as", "from . import scistream_pb2 as", text, flags=re.M)
grpc_file.write_text(text)
print("regenerated", *sorted(p.name for p in proto_dir.glob("scistream_pb2*")))
