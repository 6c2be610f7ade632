"""Command-line interfaces (click): s2cs, s2uc, appctrl, s2ds, scistream.

gRPC's C core logs on its own (a failed TLS handshake, a port it cannot bind) straight to
stderr, apart from Python's logging; our messages already say what happened and what to
do. Its verbosity is read once, when grpc is imported, so it is set here, before any
command module imports grpc: nothing from it unless the command line asks for ``-v`` /
``--verbose`` (or GRPC_VERBOSITY is set by the caller).
"""
import os as _os
import sys as _sys

if not any(a in ("-v", "--verbose") for a in _sys.argv[1:]):
    _os.environ.setdefault("GRPC_VERBOSITY", "NONE")
