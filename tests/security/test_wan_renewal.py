"""A session without a lease outlives its WAN leaf: each gateway issues it again before it
ends (``DataServer.renew_at``, driven by the control server's lease loop), new connections
get the new leaf, and the session keeps carrying bytes after the first leaves ended. Here a
leaf lives 20 s and is issued again when less than 15 s are left."""
from __future__ import annotations

import asyncio
import datetime
import ssl

import pytest
from cryptography import x509

from conftest import async_wait_until, connect_session, parse_listener, roundtrip_ok
from scistream.data import wankeys
from scistream.data.node.client import ServiceError


async def served_leaf(listener: str, files: wankeys.CredentialFiles) -> x509.Certificate:
    """The leaf the PROD listener shows a peer that holds the session's credentials."""
    ctx = wankeys.ssl_context(files, server=False)
    host, port = parse_listener(listener)
    _, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx,
                                                          server_hostname=wankeys.SESSION_NAME), 10)
    try:
        der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        w.close()
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize("kind", ["Builtin", "Haproxy", "Nginx"])
async def test_the_leaf_of_a_session_without_a_lease_is_issued_again(kind, servers, client_for, echo_server,
                                                                      tmp_path, monkeypatch):
    monkeypatch.setattr(wankeys, "LIFETIME", datetime.timedelta(seconds=20))
    monkeypatch.setattr(wankeys, "RENEW_BEFORE", datetime.timedelta(seconds=15))
    prod_srv = await servers(server_type=kind)
    cons_srv = await servers(server_type=kind)
    pc, cc = client_for(prod_srv), client_for(cons_srv)
    uid, prod, cons = await connect_session(pc, cc, f"{echo_server[0]}:{echo_server[1]}", num_conn=1)
    await roundtrip_ok(cons.listeners[0])
    files = wankeys.write_credentials(prod.wan_secret, uid, tmp_path / "peer")
    first = await served_leaf(prod.listeners[0], files)
    life = first.not_valid_after_utc - first.not_valid_before_utc
    assert life <= datetime.timedelta(seconds=20) + wankeys.SKEW + datetime.timedelta(seconds=2), life

    async def renewed():
        leaf = await served_leaf(prod.listeners[0], files)
        return leaf if leaf.serial_number != first.serial_number else None
    second = await async_wait_until(renewed, 30, "a new WAN leaf on the PROD listener")
    assert second.not_valid_after_utc > first.not_valid_after_utc
    assert second.issuer == first.issuer and second.public_key() == first.public_key()
    # once the first leaves have ended, a new connection still gets through: the CONS
    # gateway's leaf (which PROD checks) was issued again too
    now = lambda: datetime.datetime.now(datetime.timezone.utc)  # noqa: E731
    await async_wait_until(lambda: now() > first.not_valid_after_utc + datetime.timedelta(seconds=1), 30,
                           "the first leaf to end")
    await roundtrip_ok(cons.listeners[0])
    if kind == "Builtin":   # the node service takes a new leaf only from the session's own secret
        with pytest.raises(ServiceError, match="not session"):
            await prod_srv.node.call({"op": "credentials", "sid": f"{uid}/PROD",
                                      "wan_secret": wankeys.new_secret().hex(), "cert_until": 0})
        await roundtrip_ok(cons.listeners[0])
    await pc.release(uid)
    await cc.release(uid)
