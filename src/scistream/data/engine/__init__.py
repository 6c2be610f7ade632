"""Moving a session's bytes: the event loop (``loop``), one forwarded connection and its
plain pumps (``conn``), the TLS leg (``tlsleg``) and the compiled pumps (``_pump.c``,
imported by ``compiled`` only). The node service's workers run these; nothing here knows
of sessions' control.
"""
