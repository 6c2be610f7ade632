"""SciStream: on-demand, authenticated memory-to-memory streaming between facilities.

Parts: the control server (``scistream.control``, CLI ``s2cs``), the data servers
(``scistream.data``), the user client (``scistream.client``, CLI ``s2uc``) and the
application controller (``scistream.appctrl``, CLI ``appctrl``).
"""
from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Looked up on first use: importlib.metadata (and the email and zipfile modules it
    # pulls in) would cost every data-server process ~30 ms and a few MB at start.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            value = version("scistream")
        except PackageNotFoundError:  # running from a source tree
            value = "0.0.0"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'scistream' has no attribute {name!r}")
