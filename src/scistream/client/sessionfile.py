"""The user's local record of sessions this client set up.

``prod-req`` and ``cons-req`` are separate commands, yet the per-session WAN secret that
the PROD S2CS hands to the owner must reach the CONS S2CS. The client keeps it in a file
only the user can read (``~/.config/scistream/sessions/UID.json``, mode 0600), never on the
terminal, and removes it on release. It also keeps, for each side this client set up
(``sides``: PROD from ``prod-req``, ``inbound-request`` or ``connect``; CONS from ``cons-req``,
``outbound-request`` or ``connect``), the control server's address (with several instances
of one facility, the whole comma-separated list) and how to reach it: the certificate it
was verified against (the PEM itself, so a moved or deleted file does not matter) or that
the channel was plaintext. ``s2uc release UID``, ``s2uc status UID`` and ``s2uc disconnect
UID`` use them when given no ``--s2cs``; any command given an address but no certificate
uses the one recorded for that address. ``s2cs`` keeps the PROD side's address, as before.

    save_side(uid, "PROD", "10.0.0.2:5000", cert_pem=b"-----BEGIN...", insecure=False)
    sides(uid)  -> {"PROD": {"s2cs": "10.0.0.2:5000", "cert_pem": "-----BEGIN...", "insecure": False}}
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from ..config import config_dir


def sessions_dir() -> Path:
    d = config_dir() / "sessions"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def save(uid: str, **fields) -> Path:
    path = sessions_dir() / f"{uid}.json"
    data = load(uid)
    for k, v in fields.items():
        data[k] = base64.b64encode(v).decode() if isinstance(v, bytes) else v
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return path


def load(uid: str) -> dict:
    path = sessions_dir() / f"{uid}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wan_secret(uid: str) -> bytes:
    value = load(uid).get("wan_secret")
    return base64.b64decode(value) if value else b""


def save_side(uid: str, role: str, s2cs: str, *, cert_pem: bytes | None, insecure: bool, **fields) -> Path:
    """Record how the ``role`` side of ``uid`` was reached (and ``fields`` besides)."""
    known = sides(uid)
    known[role] = {"s2cs": s2cs, "cert_pem": cert_pem.decode() if cert_pem else None, "insecure": insecure}
    extra = {"s2cs": s2cs} if role == "PROD" or "s2cs" not in load(uid) else {}
    return save(uid, sides=known, **extra, **fields)


def sides(uid: str) -> dict[str, dict]:
    """The sides of ``uid`` this client recorded (a file of an older version: its PROD
    address, without a certificate)."""
    data = load(uid)
    known = data.get("sides")
    if isinstance(known, dict):
        return {r: v for r, v in known.items() if isinstance(v, dict) and v.get("s2cs")}
    return {"PROD": {"s2cs": data["s2cs"], "cert_pem": None, "insecure": False}} if data.get("s2cs") else {}


def drop_side(uid: str, s2cs: str) -> None:
    """The side(s) of ``uid`` on ``s2cs`` were released: forget them, and the whole record
    once no side is left."""
    left = {r: v for r, v in sides(uid).items() if v["s2cs"] != s2cs}
    if not left:
        forget(uid)
    else:
        save(uid, sides=left, s2cs=left.get("PROD", next(iter(left.values())))["s2cs"])


def recorded_access(s2cs: str, uid: str | None = None) -> dict | None:
    """How this client reached ``s2cs`` for ``uid`` (else for any session it recorded, the
    newest first): ``{"cert_pem": ..., "insecure": ...}``, or None."""
    files = sorted(sessions_dir().glob("*.json"), key=_mtime, reverse=True)
    if uid:
        files.insert(0, sessions_dir() / f"{uid}.json")
    for path in files:
        for side in sides(path.stem).values():
            if side["s2cs"] == s2cs and (side.get("cert_pem") or side.get("insecure")):
                return side
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def forget(uid: str) -> None:
    (sessions_dir() / f"{uid}.json").unlink(missing_ok=True)
