"""The encrypted UDP WAN leg of the built-in type: each datagram sealed with AES-256-GCM.

Keys come from the session's WAN secret (``master_key``: HKDF-SHA256, its own label, so
nothing of the TLS leg's keys is reused), then per flow, direction and epoch
(``flow_key``): the CONS gateway opens a flow with a fresh flow id, and each direction
of that flow has keys of its own, so a (key, nonce) pair is never used twice. A sealed
datagram on the wire::

    version(1) | session tag(4) | flow id(8) | epoch(2) | counter(8) | ciphertext | GCM tag(16)

The first 23 bytes are authenticated (the AEAD's associated data); the nonce is 4 zero
bytes and the 64-bit counter. The session tag (from the master key) names the session:
a datagram of another session is dropped as ``foreign`` before any key is derived.

Opening, nothing that fails is ever delivered; each drop is counted by cause:
``truncated`` (shorter than a header and a tag, or another version), ``foreign``
(another session's tag), ``forged`` (fails to authenticate), ``replayed`` (a counter
already seen, older than the sliding window of ``WINDOW`` counters, or a flow id too
old: see ``FRESH``). The replay window is checked before the AEAD (cheap refusal) and
moved only by a datagram that authenticates.

Rekeying: a sender moves to the next epoch (a new key) after ``rekey_after`` datagrams,
long before the 64-bit counter could wrap; the receiver follows on the first datagram
of the next epoch that authenticates. After 65,535 epochs the flow refuses to seal.

Flow ids begin with the CONS gateway's clock (seconds): the PROD gateway accepts a flow
id it does not hold only if it is at most ``FRESH`` seconds old, and remembers ended
flows until then, so a datagram recorded earlier cannot open a flow again (gateways'
clocks within ``FRESH`` of each other, as for TLS certificates).

Overhead: ``OVERHEAD`` bytes a datagram (39). A sealed datagram larger than the flow's
path MTU is still sent (the kernel fragments it) and counted as ``over_mtu``.

    sealer = Sealer(master_key(secret), role="CONS")
    state = sealer.new_flow()
    wire = sealer.seal_state(state, b"data")
    state2, plain = Sealer(master_key(secret), role="PROD").open(None, wire, counters)
"""
from __future__ import annotations

import os
import struct
import time
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import compiled

VERSION = 1
HEADER = struct.Struct("!B4s8sHQ")
TAG = 16
OVERHEAD = HEADER.size + TAG
#: IPv4 + UDP headers, for the MTU check (IPv6: 48; the check is on the safe side for v4).
IP_UDP = 28
#: Counters a receiver accepts behind the highest it has seen (reordering on the path).
WINDOW = 4096
_MASK = (1 << WINDOW) - 1
#: Datagrams one key seals before the sender moves to the next epoch.
REKEY_AFTER = 1 << 32
MAX_EPOCH = 0xFFFF
#: Seconds a flow id may be old when the PROD gateway first sees it; ended flows are
#: remembered this long after their id's time.
FRESH = 300.0


def master_key(secret: bytes) -> bytes:
    """The session's UDP master key, from its WAN secret."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"scistream-wan-v1",
                info=b"scistream udp v1 master").derive(secret)


def _kdf(master: bytes, info: bytes, n: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(master)


class Direction:
    """One direction of one flow: its epoch's key, the sending counter, or (receiving) the
    replay window. The compiled module's ``UdpDir`` has the same methods and is used in
    its place where the compiled pumps are (``Sealer(fast=...)``); the bytes are the same."""
    __slots__ = ("epoch", "aead", "counter", "top", "seen")

    def __init__(self, key: bytes, epoch: int, sending: bool) -> None:
        self.epoch = epoch
        self.aead = AESGCM(key)
        self.counter = 0        # sending: the next counter
        self.top = -1           # receiving: the highest counter accepted
        self.seen = 0           # receiving: bit i set = counter top - i accepted

    def seal(self, head: bytes, ctr: int, data: bytes) -> bytes:
        return self.aead.encrypt(b"\0\0\0\0" + ctr.to_bytes(8, "big"), data, head)

    def open(self, head: bytes, ctr: int, body: bytes) -> bytes | None:
        try:
            return self.aead.decrypt(b"\0\0\0\0" + ctr.to_bytes(8, "big"), body, head)
        except InvalidTag:
            return None

    def replayed(self, ctr: int) -> bool:
        return ctr <= self.top - WINDOW or (ctr <= self.top and bool(self.seen >> (self.top - ctr) & 1))

    def accept(self, ctr: int) -> None:
        if ctr > self.top:
            shift = ctr - self.top
            self.seen = ((self.seen << shift) | 1) & _MASK if shift < WINDOW else 1
            self.top = ctr
        else:
            self.seen |= 1 << (self.top - ctr)


class FlowKeys:
    """The keys of one flow (both directions), by flow id."""
    __slots__ = ("flow_id", "send", "recv", "born")

    def __init__(self, flow_id: bytes) -> None:
        self.flow_id = flow_id
        self.send: Direction | None = None
        self.recv: Direction | None = None
        self.born = struct.unpack("!I", flow_id[:4])[0]


class Sealer:
    """Seals and opens one session's datagrams on one gateway (``role`` PROD or CONS)."""

    def __init__(self, master: bytes, role: str = "CONS", rekey_after: int = REKEY_AFTER,
                 fast: bool | None = None) -> None:
        self.master = master
        # the compiled AEAD (``_pump.UdpDir``) where the compiled pumps are chosen, else Python's
        if fast is None:
            fast = compiled.pump is not None
        if fast and compiled.module is None:
            raise RuntimeError("the compiled module is not built")
        self._dir: Any = compiled.module.UdpDir if fast else Direction
        self.fast = bool(fast)
        self.role = role
        self.tag = _kdf(master, b"session tag", 4)
        self.rekey_after = max(1, int(rekey_after))
        self.out_dir, self.in_dir = (b"c2p", b"p2c") if role == "CONS" else (b"p2c", b"c2p")
        self.flows: dict[bytes, FlowKeys] = {}      # PROD: the flows it holds, by flow id
        self.ended: dict[bytes, float] = {}         # PROD: ended flow ids -> until when remembered

    def _direction(self, sending: bool, flow_id: bytes, epoch: int) -> Any:
        direction = self.out_dir if sending else self.in_dir
        return self._dir(_kdf(self.master, b"key " + direction + flow_id + struct.pack("!H", epoch)), epoch, sending)

    def new_flow(self) -> FlowKeys:
        """A CONS flow: a fresh id, this gateway's clock first."""
        return FlowKeys(struct.pack("!I", int(time.time()) & 0xFFFFFFFF) + os.urandom(4))

    # -- sealing --------------------------------------------------------------------------
    def seal_state(self, keys: FlowKeys, data: bytes) -> bytes | None:
        d = keys.send
        if d is None:
            d = keys.send = self._direction(True, keys.flow_id, 0)
        elif d.counter >= self.rekey_after:
            if d.epoch >= MAX_EPOCH:
                return None
            d = keys.send = self._direction(True, keys.flow_id, d.epoch + 1)
        ctr = d.counter
        d.counter = ctr + 1
        head = HEADER.pack(VERSION, self.tag, keys.flow_id, d.epoch, ctr)
        return head + d.seal(head, ctr, data)

    def seal(self, flow: Any, data: bytes, c: dict[str, int]) -> bytes | None:
        """``flow``: an ``engine.udp.Flow`` (its ``state``: FlowKeys, ``mtu``)."""
        out = self.seal_state(flow.state, data)
        if out is None:
            c["drops_send"] += 1
            return None
        if flow.mtu and len(out) + IP_UDP > flow.mtu:
            c["over_mtu"] += 1
        return out

    # -- opening --------------------------------------------------------------------------
    def open(self, keys: FlowKeys | None, data: bytes, c: dict[str, int]) -> tuple[FlowKeys, bytes] | None:
        """(the flow's keys, the plaintext), or None with the drop counted. ``keys``: the
        flow's, if the datagram came on a known flow; else (PROD) found or made by flow id."""
        if len(data) < OVERHEAD or data[0] != VERSION:
            c["drops_truncated"] += 1
            return None
        _, tag, flow_id, epoch, ctr = HEADER.unpack_from(data)
        if tag != self.tag:
            c["drops_foreign"] += 1
            return None
        new = False
        if keys is None or keys.flow_id != flow_id:
            if self.role == "CONS":        # a CONS flow knows its id: another is not its peer's
                c["drops_forged"] += 1
                return None
            keys = self.flows.get(flow_id)
            if keys is None:
                if flow_id in self.ended or abs(time.time() - struct.unpack("!I", flow_id[:4])[0]) > FRESH:
                    c["drops_replayed"] += 1
                    return None
                keys = FlowKeys(flow_id)
                new = True
        d = keys.recv
        if d is None or epoch != d.epoch:
            if d is not None and epoch != d.epoch + 1:     # only forward, one epoch at a time
                c["drops_replayed" if epoch < d.epoch else "drops_forged"] += 1
                return None
            d = self._direction(False, flow_id, epoch)
        elif d.replayed(ctr):
            c["drops_replayed"] += 1
            return None
        plain = d.open(data[:HEADER.size], ctr, data[HEADER.size:])
        if plain is None:
            c["drops_forged"] += 1
            return None
        if d is not keys.recv:       # the first datagram of a (new) epoch: it authenticated
            keys.recv = d
        d.accept(ctr)
        if new:
            self.flows[flow_id] = keys
        return keys, plain

    def forget(self, keys: FlowKeys | None) -> None:
        """A flow ended (PROD): its id is refused from now until it is no longer fresh."""
        if keys is None or self.role == "CONS":
            return
        if self.flows.pop(keys.flow_id, None) is not None:
            self.ended[keys.flow_id] = keys.born + FRESH
        now = time.time()
        if len(self.ended) > 64:
            for fid in [f for f, until in self.ended.items() if until < now]:
                del self.ended[fid]
