"""The user's local record of sessions this client set up.

``prod-req`` and ``cons-req`` are separate commands, yet the per-session WAN secret that
the PROD S2CS hands to the owner must reach the CONS S2CS. The client keeps it in a file
only the user can read (``~/.config/scistream/sessions/UID.json``, mode 0600), never on the
terminal, and removes it on release. It also keeps the control server the PROD side was
requested from (``s2cs``: with several instances of one facility, the whole comma-separated
list), which ``s2uc release UID`` and ``s2uc status UID`` use when given no ``--s2cs``.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path


def sessions_dir() -> Path:
    base = os.environ.get("SCISTREAM_CONFIG_DIR")
    if base:
        root = Path(base)
    else:
        root = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "scistream"
    d = root / "sessions"
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


def forget(uid: str) -> None:
    try:
        (sessions_dir() / f"{uid}.json").unlink()
    except FileNotFoundError:
        pass
