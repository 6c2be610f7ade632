"""SciStream: on-demand, authenticated memory-to-memory streaming between facilities.

Parts: the control server (``scistream.control``, CLI ``s2cs``), the data servers
(``scistream.data``), the user client (``scistream.client``, CLI ``s2uc``) and the
application controller (``scistream.appctrl``, CLI ``appctrl``).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scistream")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
