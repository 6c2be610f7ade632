"""The web view's server side, over HTTP(S) without a browser: TLS with the control
channel's certificate, the login cookie's flags, --auth none, bad flags, static files."""
from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import urllib.parse

from conftest import BIN, port_block
from scistream.auth.static import add_token, remove_identity
from webhelpers import http


def web_port(proc) -> int:
    return json.loads(proc.ready.read_text())["web_port"]


def test_tls_with_the_control_certificate_and_a_secure_cookie(s2cs_process, tmp_path):
    path = tmp_path / "tokens"
    alice = add_token(path, "alice")
    p = s2cs_process("--web-port", "0", "--token-file", str(path), auth="static", insecure=False)
    base = f"https://127.0.0.1:{web_port(p)}"
    cert = str(p.state_dir / "server.crt")
    served = ssl.get_server_certificate(("127.0.0.1", web_port(p)))
    leaf = open(cert).read().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(leaf)   # server.crt: leaf, then its CA
    status, _, body = http(base + "/api/sessions", token=alice, cafile=cert)
    assert status == 200 and json.loads(body)["sessions"] == []
    assert http(base + "/api/sessions", cafile=cert)[0] == 401
    form = urllib.parse.urlencode({"token": alice}).encode()
    status, headers, _ = http(base + "/login", data=form, cafile=cert)
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
    assert alice not in cookie
    sid = cookie.split(";", 1)[0]
    status, _, body = http(base + "/", cafile=cert, headers={"Cookie": sid})
    assert status == 200 and 'id="who">alice<' in body
    # no plaintext HTTP on the TLS port
    with socket.create_connection(("127.0.0.1", web_port(p)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1 200" not in s.recv(4096)


def test_login_refuses_a_cross_site_form_and_a_bad_token(s2cs_process, tmp_path):
    path = tmp_path / "tokens"
    alice = add_token(path, "alice")
    p = s2cs_process("--web-port", "0", "--token-file", str(path), auth="static")
    base = f"http://127.0.0.1:{web_port(p)}"
    form = urllib.parse.urlencode({"token": alice}).encode()
    status, headers, _ = http(base + "/login", data=form, headers={"Origin": "http://evil.example"})
    assert status == 403 and "Set-Cookie" not in headers
    status, headers, _ = http(base + "/login", data=form, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "Set-Cookie" not in headers
    status, headers, body = http(base + "/login", data=b"token=sst_wrong")
    assert status == 401 and "Set-Cookie" not in headers and "not accepted" in body
    status, headers, _ = http(base + "/login", data=form)
    assert status == 303 and "Secure" not in headers["Set-Cookie"]   # plain HTTP (--insecure)
    # a forged cookie is nobody
    assert http(base + "/api/sessions", headers={"Cookie": "scistream_web=forged"})[0] == 401
    # every page forbids outside resources and framing
    status, headers, _ = http(base + "/login")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_a_removed_token_ends_the_sign_in(s2cs_process, tmp_path):
    path = tmp_path / "tokens"
    alice = add_token(path, "alice")
    p = s2cs_process("--web-port", "0", "--token-file", str(path), auth="static")
    base = f"http://127.0.0.1:{web_port(p)}"
    _, headers, _ = http(base + "/login", data=urllib.parse.urlencode({"token": alice}).encode())
    sid = headers["Set-Cookie"].split(";", 1)[0]
    assert http(base + "/api/sessions", headers={"Cookie": sid})[0] == 200
    assert remove_identity(path, "alice") == 1
    assert http(base + "/api/sessions", headers={"Cookie": sid})[0] == 401
    assert http(base + "/api/sessions", token=alice)[0] == 401


def test_auth_none_shows_everything_under_a_banner(s2cs_process):
    p = s2cs_process("--web-port", "0")
    status, _, body = http(f"http://127.0.0.1:{web_port(p)}/")
    assert status == 200 and 'id="noauth"' in body and "AUTHENTICATION IS DISABLED" in body
    status, _, body = http(f"http://127.0.0.1:{web_port(p)}/api/sessions")
    assert status == 200


def test_static_files_and_nothing_else(s2cs_process):
    p = s2cs_process("--web-port", "0")
    base = f"http://127.0.0.1:{web_port(p)}"
    status, headers, body = http(base + "/static/vendor/uPlot.iife.min.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and "uPlot" in body
    assert http(base + "/static/app.js")[0] == 200
    for bad in ("/static/../web.py", "/static/%2e%2e/web.py", "/static/vendor/../../web.py",
                "/static/nothing.js", "/static/vendor/VERSION", "/admin"):
        assert http(base + bad)[0] == 404, bad
    assert http(base + "/api/sessions", data=b"x")[0] == 405


def test_bad_web_flags_one_line_exit_2(tmp_path):
    def run(*args):
        return subprocess.run([str(BIN / "s2cs"), "--port", "0", "--auth", "none", "--insecure",
                               "--port-range", port_block(), "--state-dir", str(tmp_path / "s"), *args],
                              capture_output=True, text=True, timeout=60)
    bad = run("--web-port", "70000")
    assert bad.returncode == 2 and "--web-port" in bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = run("--web-port", str(busy.getsockname()[1]))
    assert taken.returncode == 2
    assert "cannot serve the web view on 127.0.0.1:" in taken.stderr


async def test_first_paint_of_a_live_session_shows_its_bytes(servers, client_for, echo_server):
    """No page listened before: the first paint reads the data servers' counters afresh
    (not the 0 / 0 of a sampler that never ran), in KiB/MiB with the exact count in the
    tooltip; the chart's time axis is UTC, as the timeline."""
    from conftest import connect_session, roundtrip_ok
    from webhelpers import ahttp
    prod = await servers(web_port=0)
    cons = await servers()
    uid, _, cons_resp = await connect_session(client_for(prod), client_for(cons), "%s:%d" % echo_server,
                                              num_conn=1)
    await roundtrip_ok(cons_resp.listeners[0], 3 << 20)
    base = f"http://127.0.0.1:{prod.web_port}"
    status, _, page = await ahttp(f"{base}/session/{uid}/PROD")
    assert status == 200
    shown = re.search(r'<span id="bytes" title="(\d+) / (\d+) bytes">([^<]*)</span>', page)
    assert shown and shown.group(1) == shown.group(2) == str(3 << 20), page
    assert shown.group(3) == "3.0 MiB / 3.0 MiB"
    assert re.search(r"<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ</time>", page)   # the timeline: UTC
    status, _, script = await ahttp(f"{base}/static/app.js")
    assert status == 200 and 'label: "UTC"' in script and "toISOString" in script   # the chart's axis too
