"""Who is calling: authenticators for the control server, and the user's Globus login.

Server side: ``base`` (``Identity``, ``Authenticator``, ``make_authenticator``) and one
module per ``s2cs --auth`` kind: ``static``, ``jwt``, ``globus``. Client side: ``tokens``
(settings, token store, ``stored_token``) and ``login`` (native-app flow, logout).

    auth = make_authenticator("static", token_file="/etc/scistream/tokens")
    who = await auth.authenticate("Bearer sst_...")
"""
from .base import AuthConfigError, Authenticator, Identity, make_authenticator

__all__ = ["AuthConfigError", "Authenticator", "Identity", "make_authenticator"]
