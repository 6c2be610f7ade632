"""Who is calling: authenticators for the control server.

``base`` defines ``Identity`` and ``Authenticator``; ``make_authenticator`` builds the one
``s2cs --auth`` names.
"""
from .base import Authenticator, Identity, make_authenticator

__all__ = ["Authenticator", "Identity", "make_authenticator"]
