"""The compiled pumps (``_pump.c``): the one module that imports them and decides, once, what
they may do here.

``_pump`` is optional (built where a C compiler, Python's headers and libssl-dev were
there). What it may do:

* ``PUMPS``: ``"c"`` when the compiled plain copier, hub, TLS engine and UDP batches
  (``udp_pass``, and ``UdpDir`` for the sealed UDP leg; they call libcrypto only, never
  Python's ``ssl``) run, ``"python"``
  when the Python pumps do (not built, or ``SCISTREAM_PUMPS=python``).
* ``ssl_ext``: the module, where it may touch Python's ``ssl`` objects at all: only when
  the libssl it calls is the very one Python's ``_ssl`` runs. A Python that links
  OpenSSL statically (python-build-standalone, as uv installs it) has a copy of its own
  whose structures ours must never read: refused with one log line, and TLS legs use
  the Python pumps (the plain copier and hub call no OpenSSL and stay compiled). Its
  session-ticket keys (``tlsleg.share_tickets``) do not depend on ``SCISTREAM_PUMPS``.
* ``TLS_ENGINE``: whether its TLS engine takes a connection's ``SSL*`` over (``ssl_ext``
  and the compiled pumps).

    from .compiled import PUMPS, TLS_ENGINE, pump
    if PUMPS == "c": copier = pump.Copier()
"""
from __future__ import annotations

import logging
import os
import ssl
from types import ModuleType

log = logging.getLogger(__name__)

try:                      # the compiled hot paths; optional
    from . import _pump as _compiled
except ImportError:       # pragma: no cover - built wherever a C compiler was there
    _compiled = None


def libssl_mismatch(module: ModuleType | None, ssl_file: str | None) -> str:
    """Why ``module``'s TLS engine must not take over Python's ``SSL*`` ('' if it may):
    ``ssl_file`` is the file of Python's ``_ssl`` extension (None: built into the program)."""
    if module is None:
        return "the compiled pumps are not built"
    same, ours = module.same_libssl(ssl_file)
    if not same:
        where = ssl_file or "the Python executable"
        return (f"Python's ssl runs another OpenSSL than the compiled pumps were linked with "
                f"(theirs: {ssl.OPENSSL_VERSION} in {where}; ours: version 0x{ours:x})")
    if ours != ssl.OPENSSL_VERSION_NUMBER:
        return (f"Python's ssl reports OpenSSL 0x{ssl.OPENSSL_VERSION_NUMBER:x}, the compiled pumps "
                f"0x{ours:x}")
    return ""


def _decide() -> tuple[ModuleType | None, str, ModuleType | None]:
    """``SCISTREAM_PUMPS``: auto (the compiled pumps where built), c (the same; says so when
    they are missing), python (the pumps written in Python)."""
    text = os.environ.get("SCISTREAM_PUMPS")
    choice = (text or "auto").strip().lower() or "auto"
    if choice not in ("auto", "c", "python"):
        log.warning("SCISTREAM_PUMPS=%r: not auto, c or python; using auto", text)
        choice = "auto"
    if _compiled is None:
        if choice == "c":
            log.warning("SCISTREAM_PUMPS=c, but the compiled pumps were not built: using Python's")
        return None, "python", None
    why = libssl_mismatch(_compiled, getattr(ssl._ssl, "__file__", None))   # type: ignore[attr-defined]
    if why:
        log.warning("compiled TLS engine refused: %s; TLS legs use the Python pumps", why)
    ssl_ext = None if why else _compiled
    return (None, "python", ssl_ext) if choice == "python" else (_compiled, "c", ssl_ext)


#: The compiled module where it was built, else None (its tests use it whatever the choice).
module = _compiled
#: The compiled module where its pumps are used, else None.
pump, PUMPS, ssl_ext = _decide()
TLS_ENGINE = pump is not None and ssl_ext is not None

#: What a compiled pump's call found (``_pump.F_*``).
F_SRC_AGAIN, F_DST_AGAIN, F_EOF, F_EMPTY = ((pump.F_SRC_AGAIN, pump.F_DST_AGAIN, pump.F_EOF, pump.F_EMPTY)
                                            if pump is not None else (1, 2, 4, 8))


def on_context(ctx: ssl.SSLContext, call: str, *args: object) -> None:
    """Run the compiled module's ``call`` (``set_ticket_keys``, ``set_groups``) on the SSL_CTX
    behind ``ctx``, through an SSLObject of it that the module checks before it reads
    anything; RuntimeError where the module may not touch Python's ssl (``ssl_ext``)."""
    if ssl_ext is None:
        raise RuntimeError("the compiled module is not built, or not linked with the libssl Python's ssl runs")
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    probe = ctx.wrap_bio(inc, out, server_side=ctx.protocol is not ssl.PROTOCOL_TLS_CLIENT)
    getattr(ssl_ext, call)(probe._sslobj, inc, out, *args)   # type: ignore[attr-defined]
