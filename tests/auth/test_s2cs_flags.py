"""`s2cs --auth ...` flags: clear start errors, and servers that start and check tokens."""
from __future__ import annotations

import json
import os
import subprocess
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from conftest import BIN, port_block
from scistream.client import AsyncClient
from scistream.errors import NotFound, Unauthenticated


def start_error(tmp_path, *args: str, env: dict | None = None) -> str:
    full = [str(BIN / "s2cs"), "--port", "0", "--insecure", "--port-range", port_block(),
            "--state-dir", str(tmp_path / "state"), *args]
    e = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_GLOBUS_")}
    e.update(env or {})
    p = subprocess.run(full, capture_output=True, text=True, timeout=60, env=e, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    return " ".join((p.stdout + p.stderr).split())


@pytest.mark.parametrize("args, message", [
    (["--auth", "jwt"], "--auth jwt needs --jwt-jwks PATH_OR_URL, --jwt-issuer ISS, --jwt-audience AUD"),
    (["--auth", "jwt", "--jwt-jwks", "k.json", "--jwt-issuer", "i"], "--auth jwt needs --jwt-audience AUD"),
    (["--auth", "jwt", "--jwt-jwks", "missing.json", "--jwt-issuer", "i", "--jwt-audience", "a"],
     "JWKS file missing.json does not exist"),
    (["--auth", "static"], "--auth static needs --token-file FILE"),
    (["--auth", "static", "--token-file", "nope"], "s2cs token add IDENTITY --token-file nope"),
    (["--auth", "globus"], "SCISTREAM_GLOBUS_CLIENT_SECRET"),
    (["--auth", "globus", "--client-id", "abc", "--client_secret", "shh"], "visible to every user"),
    (["--auth", "static", "--jwt-jwks", "k.json", "--token-file", "t"], "--jwt-jwks does not apply to --auth static"),
    (["--auth", "none", "--token-file", "t"], "--token-file does not apply to --auth none"),
    ([], "choose an authenticator with --auth"),
])
def test_start_errors_are_clear(tmp_path, args, message):
    assert message in start_error(tmp_path, *args)


def test_globus_needs_a_scope(tmp_path):
    out = start_error(tmp_path, "--auth", "globus",
                      env={"SCISTREAM_GLOBUS_CLIENT_ID": "cid-1", "SCISTREAM_GLOBUS_CLIENT_SECRET": "s"})
    assert "--globus-scope" in out and "scopes/cid-1/" in out and "SCISTREAM_GLOBUS_CLIENT_SECRET" not in out


def test_globus_server_starts_with_credentials_from_a_file(s2cs_process, tmp_path):
    conf = tmp_path / "globus.toml"
    conf.write_text('client_id = "cid-1"\nclient_secret = "secret-made-here"\n'
                    'scope = "https://auth.globus.org/scopes/cid-1/scistream"\n')
    conf.chmod(0o600)
    srv = s2cs_process("--globus-config", str(conf), auth="globus")  # starts: no network at start
    assert srv.stop() == 0
    assert "secret-made-here" not in srv.log()


async def test_jwt_server_process_checks_tokens(s2cs_process, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    pub = ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "k1"}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [pub]}))
    srv = s2cs_process("--jwt-jwks", str(jwks), "--jwt-issuer", "https://idp.test", "--jwt-audience", "s2cs",
                       "--jwt-leeway", "5", auth="jwt")
    now = int(time.time())
    good = jwt.encode({"iss": "https://idp.test", "aud": "s2cs", "sub": "u1", "exp": now + 60}, key,
                      algorithm="ES256", headers={"kid": "k1"})
    bad = jwt.encode({"iss": "https://idp.test", "aud": "other", "sub": "u1", "exp": now + 60}, key,
                     algorithm="ES256", headers={"kid": "k1"})
    async with AsyncClient(srv.target, insecure=True, token=good) as c:
        with pytest.raises(NotFound):            # authenticated: the server looked the uid up
            await c.release("6f1c2b8e-1d2a-4c1e-9f0a-0b1c2d3e4f50")
    async with AsyncClient(srv.target, insecure=True, token=bad) as c:
        with pytest.raises(Unauthenticated, match="not meant for this S2CS"):
            await c.release("6f1c2b8e-1d2a-4c1e-9f0a-0b1c2d3e4f50")
    assert srv.stop() == 0
    assert good not in srv.log() and bad not in srv.log()
