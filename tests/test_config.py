"""The s2cs configuration file: every key is a flag, every problem says where."""
from __future__ import annotations

from pathlib import Path

import pytest

from scistream.cli import s2cs as s2cs_cli
from scistream.config import ConfigFileError, check, key_lines, load, schema_for


@pytest.fixture(scope="module")
def schema():
    return schema_for(s2cs_cli.start)


def write(tmp_path: Path, text: str, name: str = "s2cs.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(tmp_path, schema, text):
    return [str(p) for p in check(write(tmp_path, text), schema)]


def test_every_flag_is_a_key(schema):
    flags = {o[2:] for p in s2cs_cli.start.params if not getattr(p, "hidden", False)
             for o in p.opts if o.startswith("--") and "_" not in o}
    flags -= {"help", "ready-file", "config"}
    assert flags <= set(schema), flags - set(schema)
    assert schema["type"].param == "server_type" and schema["type"].choices
    assert schema["admin"].multiple and schema["port"].kind == "int" and schema["insecure"].kind == "bool"


def test_good_file_loads_with_paths_relative_to_it(tmp_path, schema):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "server.crt").write_text("x")
    (tmp_path / "etc" / "server.key").write_text("x")
    p = write(tmp_path / "etc", """
# a gateway
port = 5001
listener_ip = "10.0.0.2"        # the original's underscore spelling works too
type = "haproxysubprocess"      # choices are case-insensitive, like the flag
port-range = "5100-5200"
hello-timeout = 30              # an integer where a number is expected is fine
max-conn = 8
server-cert = "server.crt"
server-key = "server.key"
auth = "none"
admin = ["ops@facility.org", "root@facility.org"]
wan-plaintext = true
""")
    values = load(p, schema)
    assert values["port"] == 5001 and values["listener_ip"] == "10.0.0.2"
    assert values["server_type"] == "haproxysubprocess" and values["hello_timeout"] == 30
    assert values["server_cert"] == tmp_path / "etc" / "server.crt"
    assert values["admins"] == ("ops@facility.org", "root@facility.org")
    assert values["wan_plaintext"] is True
    assert check(p, schema) == []


def test_unknown_key_has_its_line_and_a_suggestion(tmp_path, schema):
    got = problems(tmp_path, schema, 'auth = "none"\n\nlistner-ip = "10.0.0.2"\nfrobnicate = 3\n')
    assert got[0] == f"{tmp_path}/s2cs.toml:3: listner-ip: unknown key (did you mean listener-ip?)"
    assert got[1].startswith(f"{tmp_path}/s2cs.toml:4: frobnicate: unknown key; `s2cs --help` lists")


def test_tables_are_key_paths(tmp_path, schema):
    got = problems(tmp_path, schema, 'auth = "none"\n[limits]\nmax = 3\n')
    assert got == [f"{tmp_path}/s2cs.toml:3: limits.max: unknown key: the file has no tables; every key "
                   "is an s2cs flag name at the top level"]
    got = problems(tmp_path, schema, '[auth]\nmethod = "jwt"\n')
    assert got[0].startswith(f"{tmp_path}/s2cs.toml:1: auth: expected one of none, static, jwt, globus, got table")


def test_wrong_types(tmp_path, schema):
    got = problems(tmp_path, schema, 'auth = "none"\nport = "5000"\ninsecure = "yes"\nadmin = "ops"\n'
                                     'hello-timeout = true\n')
    assert got == [
        f"{tmp_path}/s2cs.toml:2: port: expected an integer, got str '5000'",
        f"{tmp_path}/s2cs.toml:3: insecure: expected true or false, got str 'yes'",
        f"{tmp_path}/s2cs.toml:4: admin: expected a list of str values, got str 'ops'",
        f"{tmp_path}/s2cs.toml:5: hello-timeout: expected a number, got bool True",
    ]


def test_ranges_and_ports(tmp_path, schema):
    got = problems(tmp_path, schema, 'auth = "none"\nport = 70000\nport-range = "5200-5100"\nmax-conn = 0\n'
                                     'metrics-port = -1\n' if "metrics-port" in schema else
                   'auth = "none"\nport = 70000\nport-range = "5200-5100"\nmax-conn = 0\n')
    # a flag's own range is checked by the flag's type, as on the command line
    assert f"{tmp_path}/s2cs.toml:2: port: 70000 is not in the range 0<=x<=65535." in got
    assert any(g.startswith(f"{tmp_path}/s2cs.toml:3: port-range: bad port range '5200-5100'") for g in got)
    assert f"{tmp_path}/s2cs.toml:4: max-conn: must be > 0, got 0" in got
    if "metrics-port" in schema:
        assert any(g.startswith(f"{tmp_path}/s2cs.toml:5: metrics-port: -1 is not in the range") for g in got)


def test_missing_files_and_unknown_type(tmp_path, schema):
    got = problems(tmp_path, schema, 'auth = "static"\ntoken-file = "tokens"\ntype = "Squid"\n'
                                     'server-cert = "/nonexistent/server.crt"\n')
    assert got[1].startswith(f"{tmp_path}/s2cs.toml:3: type: 'Squid' is not one of")
    assert f"{tmp_path}/s2cs.toml:4: server-cert: set server-key too: the certificate and its key go together" in got
    assert f"{tmp_path}/s2cs.toml:4: server-cert: file /nonexistent/server.crt does not exist" in got
    assert f"{tmp_path}/s2cs.toml:2: token-file: file {tmp_path}/tokens does not exist" in got


def test_syntax_error_has_its_line(tmp_path, schema):
    got = problems(tmp_path, schema, 'auth = "none"\nport = 5000\nlistener-ip = 10.0.0.2\n')
    assert len(got) == 1 and got[0].startswith(f"{tmp_path}/s2cs.toml:3: not valid TOML: ")


def test_set_twice_and_missing_auth(tmp_path, schema):
    got = problems(tmp_path, schema, 'listener-ip = "a.example"\nlistener_ip = "b.example"\n')
    assert got == [f"{tmp_path}/s2cs.toml:2: listener_ip: set twice (also as listener-ip)",
                   f"{tmp_path}/s2cs.toml: auth: not set; the server will not start without it "
                   "(one of none, static, jwt, globus)"]


def test_load_raises_with_every_problem(tmp_path, schema):
    with pytest.raises(ConfigFileError) as info:
        load(write(tmp_path, 'port = "x"\nbogus = 1\n'), schema)
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigFileError, match="cannot read it"):
        load(tmp_path / "absent.toml", schema)


def test_key_lines():
    text = 'a = 1\n[t]\nb = """\nc = 2\n"""\n"d.e" = 3\nf.g = 4\n'
    assert key_lines(text) == {"a": 1, "t": 2, "t.b": 3, "t.d.e": 6, "t.f.g": 7}


def test_facility_needs_its_store_and_node_token(tmp_path, schema):
    out = problems(tmp_path, schema, 'auth = "none"\nfacility = true\nnode-token-file = "nope.token"\n')
    assert any("facility: a facility needs store" in p for p in out), out
    assert any("node_token_file" in p.replace("-", "_") and "does not exist" in p for p in out), out
    (tmp_path / "t").write_text("x" * 32)
    good = ('auth = "none"\nfacility = true\nnode-token-file = "t"\n'
            'store = "postgresql://scistream@db.example.org/scistream"\n')
    assert problems(tmp_path, schema, good) == []
