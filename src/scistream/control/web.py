"""The web view of one control server: its sessions and their throughput, live, read-only.

``s2cs --web-port PORT`` serves it on the control server's own event loop (aiohttp, no
thread per request), over TLS with the control channel's certificate unless ``--insecure``.

    GET  /                           summary (pool use, sessions per state) + table of sessions
    GET  /session/UID/ROLE           one session: live chart of throughput, timeline, last error
    GET  /events[?uid=UID&role=ROLE] server-sent events, one per second: the table, or one session
    GET  /api/sessions               the table as JSON; /api/session/UID/ROLE one session
    GET  /login, POST /login         a form that takes a token; POST /logout
    GET  /static/...                 the page's script, style and charting library (uPlot, vendored)

Who may see what is decided exactly as for the RPCs: the control server's authenticator
turns a token into an identity - from an ``Authorization: Bearer TOKEN`` header, or from
the session cookie the login form sets (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over
TLS; the cookie holds a random id, the token stays in the server's memory and is checked
again on every request, so a token removed from the token file stops working at once).
A user sees their own sessions, an ``--admin`` identity every session; any other session
answers 404, as an unknown one does. ``--auth none`` shows everything under a warning banner.

Throughput comes from the data servers' counters: while at least one page listens to
``/events``, a sampler asks every live data server for its counters once a second (in
parallel, bounded) and keeps the last ``HISTORY`` rates of each session for the charts.

    view = WebView(registry, auth, auth_none=False)
    port = await view.serve("127.0.0.1", 8443, ssl_context)
    ...
    await view.close()
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import html
import json
import logging
import secrets
import socket
import ssl
import time
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from ..auth.base import ANONYMOUS, AuthUnavailable, Authenticator, Identity
from ..data.telemetry import hops as chain_hops, verdict
from ..errors import ScistreamError
from ..data.spec import udp_summary
from ..units import bitrate, duration, size
from .sessions import TERMINAL, S, Session, SessionRegistry

log = logging.getLogger(__name__)

COOKIE = "scistream_web"
COOKIE_TTL = 12 * 3600        # seconds a login lasts
MAX_LOGINS = 10000            # remembered login cookies (the oldest go first)
SAMPLE_EVERY = 1.0            # seconds between two samples of the counters
HISTORY = 300                 # samples kept per session (5 minutes)
REAUTH_EVERY = 10.0           # an open event stream checks its token again this often
STATIC = resources.files("scistream.control") / "static"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".png": "image/png", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
SECURITY_HEADERS = {
    # nothing but this server: no CDN, no inline script, no framing
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",   # (no-referrer would make the form's Origin "null")
    "X-Frame-Options": "DENY",
}
NO_AUTH_BANNER = ("--auth none: AUTHENTICATION IS DISABLED on this control server. Anyone who "
                  "reaches it sees every session (and may create and release sessions). "
                  "For development only.")


class _Answer(Exception):
    """Answer the request with the response given (a login page for a caller without a token)."""


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


class _Rates:
    """The throughput history of one session, from successive counter readings."""

    __slots__ = ("last", "history")

    def __init__(self) -> None:
        self.last: tuple[float, int, int] | None = None
        self.history: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=HISTORY)

    def add(self, t: float, bytes_in: int, bytes_out: int) -> None:
        # after a pause in sampling (no page listened), no rate is made up over the gap
        if self.last is not None and self.last[0] < t <= self.last[0] + 5 * SAMPLE_EVERY:
            dt = t - self.last[0]
            self.history.append((t, max(0, bytes_in - self.last[1]) * 8 / dt,
                                 max(0, bytes_out - self.last[2]) * 8 / dt))
        self.last = (t, bytes_in, bytes_out)

    @property
    def now(self) -> tuple[float, float]:
        return (self.history[-1][1], self.history[-1][2]) if self.history else (0.0, 0.0)


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z" if t else "-"


COLUMNS = [("uid", "uid"), ("owner", "owner"), ("role", "role"), ("state", "state"), ("age", "age"),
           ("lease_left", "lease left"), ("conns", "conns open / total"), ("rate_in_h", "to producer"),
           ("rate_out_h", "to consumer"), ("wan_security", "WAN"), ("server_type", "data server"),
           ("node", "node")]


class WebView:
    def __init__(self, registry: SessionRegistry, auth: Authenticator, *, auth_none: bool = False) -> None:
        self.registry = registry
        self.auth = auth
        self.auth_none = auth_none
        self.secure = False    # serving over TLS (serve): cookies are Secure
        self.hostname = socket.gethostname()
        self.logins: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self.rates: dict[tuple[str, str, float], _Rates] = {}
        self.sampled = 0.0                       # time of the last sample
        self._tick = asyncio.Condition()         # notified after each sample
        self._viewers = 0
        self._wanted = asyncio.Event()           # set while a page listens to /events
        self._closing = asyncio.Event()
        self._streams: set[asyncio.Task] = set()
        self._sampler: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._files: dict[str, tuple[bytes, str]] = {}
        self.app = web.Application(middlewares=[self._headers], client_max_size=64 * 1024)
        self.app.add_routes([
            web.get("/", self.index), web.get("/session/{uid}/{role}", self.session_page),
            web.get("/events", self.events), web.get("/api/sessions", self.api_sessions),
            web.get("/api/session/{uid}/{role}", self.api_session), web.get("/login", self.login_page),
            web.post("/login", self.login), web.post("/logout", self.logout),
            web.get("/static/{path:.+}", self.static)])

    # -- lifecycle -----------------------------------------------------------------------
    async def serve(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on host:port (0: any free port); return the bound port."""
        self.secure = ssl_context is not None
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self._sampler = asyncio.create_task(self._sample_loop())
        return self._runner.addresses[0][1]

    async def close(self) -> None:
        self._closing.set()
        for t in list(self._streams):
            t.cancel()
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), 5.0)
            self._runner = None

    # -- sampling ------------------------------------------------------------------------
    async def _sample_loop(self) -> None:
        while True:
            await self._wanted.wait()
            started = time.monotonic()
            try:
                await self.sample()
            except Exception:  # the view must never take the server down
                log.exception("web view: sampling the data servers failed")
            async with self._tick:
                self._tick.notify_all()
            await asyncio.sleep(max(0.05, SAMPLE_EVERY - (time.monotonic() - started)))

    async def sample(self) -> None:
        """Read every live data server's counters once; add a rate point to each session."""
        reg = self.registry
        if hasattr(reg, "refresh_view"):   # a facility: sessions and counters come from the store and nodes
            try:
                await asyncio.wait_for(reg.refresh_view(), max(SAMPLE_EVERY * 0.9, 2.0))
            except Exception as exc:  # noqa: BLE001 - the page shows what it had; the log says why
                log.warning("web view: cannot read the facility's store: %s", exc)
        else:
            await reg.refresh_stats(SAMPLE_EVERY * 0.9)
        now = time.time()
        keep = set()
        for s in reg.sessions():
            k = (s.uid, s.role, s.created)
            keep.add(k)
            st = s.total_stats()
            r = self.rates.setdefault(k, _Rates())
            if s.state in TERMINAL:
                if r.last is not None and (not r.history or r.history[-1][1:] != (0.0, 0.0)):
                    r.history.append((now, 0.0, 0.0))   # the chart ends at zero
                r.last = (now, st.bytes_in, st.bytes_out)
            else:
                r.add(now, st.bytes_in, st.bytes_out)
        self.rates = {k: r for k, r in self.rates.items() if k in keep}
        self.sampled = now

    # -- who is asking -------------------------------------------------------------------
    async def identity(self, request: web.Request) -> Identity | None:
        """The caller, or None (no token, or a token the authenticator refuses)."""
        if self.auth_none:
            return ANONYMOUS
        header = request.headers.get("Authorization")
        if header is None:
            sid = request.cookies.get(COOKIE)
            found = self.logins.get(sid) if sid else None
            if found is None or found[1] < time.time():
                return None
            header = f"Bearer {found[0]}"
        try:
            return await self.auth.authenticate(header)
        except AuthUnavailable:
            raise web.HTTPServiceUnavailable(text="cannot check the token right now (identity "
                                                  "provider unreachable); try again shortly\n")
        except ScistreamError:
            return None

    def admin(self, who: Identity) -> bool:
        return self.auth_none or who.id in self.registry.config.admins

    def visible(self, who: Identity) -> list[Session]:
        return [s for s in self.registry.sessions() if self.admin(who) or s.owner.id == who.id]

    def find(self, who: Identity, uid: str, role: str) -> Session:
        s = self.registry.active.get((uid, role)) or next(   # else the latest ended one of that uid and role
            (e for e in reversed(self.registry.ended.values()) if e.uid == uid and e.role == role), None)
        if s is None or not (self.admin(who) or s.owner.id == who.id):
            raise web.HTTPNotFound(text=f"no session {uid[:64]} {role[:8]} visible to you on this server\n")
        return s

    # -- data ----------------------------------------------------------------------------
    def row(self, s: Session, now: float) -> dict[str, Any]:
        st = s.total_stats()
        r = self.rates.get((s.uid, s.role, s.created))
        rate_in, rate_out = r.now if r is not None and s.state not in TERMINAL else (0.0, 0.0)
        lease_left = (max(0.0, s.lease_expires - now) if s.lease_expires and s.state not in TERMINAL
                      else None)
        return {
            "uid": s.uid, "role": s.role, "owner": str(s.owner), "state": s.state.value,
            "created": s.created, "age_s": round(max(0.0, (s.ended or now) - s.created), 3),
            "age": duration(max(0.0, (s.ended or now) - s.created)),
            "lease_expires": s.lease_expires or None,
            "lease_left_s": None if lease_left is None else round(lease_left, 3),
            "lease_left": "unlimited" if not s.lease_expires else duration(lease_left),
            "connections": st.connections, "total_connections": st.total_connections,
            "conns": f"{st.connections} / {st.total_connections}",
            "bytes_in": st.bytes_in, "bytes_out": st.bytes_out,
            "bytes_in_h": size(st.bytes_in), "bytes_out_h": size(st.bytes_out),
            "rate_in": round(rate_in), "rate_out": round(rate_out),
            "rate_in_h": bitrate(rate_in), "rate_out_h": bitrate(rate_out),
            "wan_security": s.wan_security or "-",
            "udp": s.udp, "udp_counters": dict(st.udp), "udp_h": udp_summary(s.udp, st.udp),
            "server_type": s.server_type or self.registry.config.server_type,
            "node": s.node or s.listen_host or self.registry.config.listener_ip,
            "last_error": s.error(st), "ended": s.ended or None,
            "url": f"/session/{s.uid}/{s.role}",
        }

    def timeline(self, s: Session) -> list[dict[str, Any]]:
        steps = [("requested", s.created), ("ready", s.ready_at), ("connected", s.connected_at)]
        if s.state in TERMINAL:
            steps.append((s.state.value, s.ended))
        return [{"state": name, "at": t, "when": _fmt_time(t)} for name, t in steps if t]

    async def _fresh(self) -> None:
        """Fresh counters for a page's first paint when the sampler has not run lately (no
        page listened): a facility's view is read from the store again; a single gateway's
        data servers are asked for their byte counters (no rate point is made of it)."""
        if time.time() - self.sampled <= SAMPLE_EVERY:
            return
        await (self.sample() if hasattr(self.registry, "refresh_view")
               else self.registry.refresh_stats(SAMPLE_EVERY * 0.9))

    def summary(self, sessions: list[Session]) -> dict[str, Any]:
        reg = self.registry
        states = {st.value: 0 for st in S}
        for s in sessions:
            states[s.state.value] += 1
        out = {"node": self.hostname, "server_type": reg.config.server_type, "states": states,
               "sampled": self.sampled}
        if hasattr(reg, "nodes_view"):    # a facility: its nodes' pools
            nodes = reg.nodes_view
            return {**out, "listener_ip": "", "ports_used": sum(n["ports_used"] for n in nodes),
                    "ports_total": sum(n["ports_total"] for n in nodes),
                    "bandwidth_used_kbps": sum(n["bandwidth_used_kbps"] for n in nodes),
                    "bandwidth_max_kbps": sum(n["max_rate_kbps"] for n in nodes),
                    "nodes": [{"name": n["name"], "state": n["state"], "sessions": n["sessions"],
                               "address": n["address"]} for n in nodes]}
        return {**out, "listener_ip": reg.config.listener_ip, "ports_used": len(reg.ports.used),
                "ports_total": len(reg.ports.ports), "bandwidth_used_kbps": reg.bandwidth.used,
                "bandwidth_max_kbps": reg.bandwidth.max}

    def table(self, who: Identity) -> dict[str, Any]:
        now = time.time()
        sessions = self.visible(who)
        return {"now": now, "summary": self.summary(sessions),
                "sessions": [self.row(s, now) for s in sessions]}

    @staticmethod
    def chain(s: Session) -> dict[str, Any]:
        """The session's chain hop by hop as this gateway sees it (its two legs; the other
        gateway's hops are unknown here), each with its rate and round trip, and the hop
        that holds the session back."""
        sides = {s.role: s.legs} if s.legs and s.state not in TERMINAL else {}
        hop, words = verdict(sides)
        hops = chain_hops(sides)
        for h in hops:
            h["rate_h"] = bitrate(h["rate_bps"]) if h["rate_bps"] is not None else "?"
            h["rtt_h"] = f"{h['rtt_ms']:.1f} ms" if h["rtt_ms"] else ""
        return {"hops": hops, "hop": hop, "bottleneck": words}

    def one(self, s: Session, history: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"now": time.time(), "session": self.row(s, time.time()),
                             "timeline": self.timeline(s), "chain": self.chain(s)}
        r = self.rates.get((s.uid, s.role, s.created))
        if history:
            d["history"] = [list(p) for p in r.history] if r is not None else []
        elif r is not None and r.history:
            d["sample"] = list(r.history[-1])
        return d

    # -- pages ---------------------------------------------------------------------------
    @web.middleware
    async def _headers(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except _Answer as answer:
            resp = answer.args[0]
        except web.HTTPException as exc:
            resp = exc
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        if not request.path.startswith("/static/"):
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    def _page(self, title: str, body: str, who: Identity | None, view: str, status: int = 200,
              data: str = "") -> web.Response:
        banner = f'<div class="banner" id="noauth">{html.escape(NO_AUTH_BANNER)}</div>' if self.auth_none else ""
        user = ""
        if who is not None:
            role = " (admin: every session)" if self.admin(who) and not self.auth_none else ""
            out = ('<form method="post" action="/logout" class="inline"><button>log out</button></form>'
                   if not self.auth_none else "")
            user = f'<span class="who">signed in as <b id="who">{html.escape(str(who))}</b>{role}</span>{out}'
        page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f'<title>{html.escape(title)} - scistream</title>'
                f'<link rel="stylesheet" href="/static/vendor/uPlot.min.css">'
                f'<link rel="stylesheet" href="/static/app.css">'
                f'<script src="/static/vendor/uPlot.iife.min.js" defer></script>'
                f'<script src="/static/app.js" defer></script></head>'
                f'<body data-view="{view}"{data}>{banner}'
                f'<header><a href="/" class="brand">scistream</a> <span class="node">s2cs on '
                f'{html.escape(self.hostname)} ({html.escape(self.registry.config.listener_ip)})</span>'
                f'<span class="live" id="live" title="live updates">&#9679;</span>{user}</header>'
                f'<main>{body}</main></body></html>')
        return web.Response(text=page, content_type="text/html", charset="utf-8", status=status)

    def _login_response(self, status: int, message: str = "") -> web.Response:
        msg = f'<p class="error" id="login-error">{html.escape(message)}</p>' if message else ""
        body = (f'<h1>Sign in</h1>{msg}<p>Paste the access token you use with <code>s2uc</code> '
                f'(<code>s2uc login</code>, <code>--token</code> or an <code>s2cs token add</code> '
                f'token). It is kept in this server\'s memory for {COOKIE_TTL // 3600} hours; your '
                f'browser only holds a random cookie.</p>'
                f'<form method="post" action="/login" id="login"><input type="password" name="token" '
                f'id="token" autocomplete="off" placeholder="access token" required autofocus> '
                f'<button type="submit">sign in</button></form>')
        resp = self._page("sign in", body, None, "login", status=status)
        if status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="scistream"'
        return resp

    async def _viewer(self, request: web.Request, page: bool) -> Identity:
        """Who asks, with the counters made fresh; no one: a page answers with the login form,
        the JSON and events with 401."""
        who = await self.identity(request)
        if who is None and page:
            raise _Answer(self._login_response(401, "sign in to see sessions" if request.path == "/" else
                                       "sign in first"))
        if who is None:
            raise web.HTTPUnauthorized(text="no valid token: send Authorization: Bearer TOKEN, or "
                                            "sign in at /login\n",
                                       headers={"WWW-Authenticate": 'Bearer realm="scistream"'})
        await self._fresh()
        return who

    async def index(self, request: web.Request) -> web.Response:
        who = await self._viewer(request, True)
        return self._page("sessions", _index_body(self.table(who)), who, "index")

    async def session_page(self, request: web.Request) -> web.Response:
        who = await self._viewer(request, True)
        s = self.find(who, request.match_info["uid"], request.match_info["role"])
        attrs = f' data-uid="{html.escape(s.uid)}" data-role="{html.escape(s.role)}"'
        return self._page(f"session {s.uid}", _session_body(self.one(s)), who, "session", data=attrs)

    async def login_page(self, request: web.Request) -> web.Response:
        return _redirect("/") if self.auth_none else self._login_response(200)

    def _same_origin(self, request: web.Request) -> bool:
        """A form of this server posted it (or a client that is no browser): no login CSRF."""
        origin = request.headers.get("Origin")
        return (request.headers.get("Sec-Fetch-Site") in (None, "same-origin", "none")
                and (origin is None or origin.split("://", 1)[-1] == request.host))

    async def login(self, request: web.Request) -> web.Response:
        if not self._same_origin(request):
            raise web.HTTPForbidden(text="cross-site login refused\n")
        form = await request.post()
        token = str(form.get("token", "")).strip()
        if self.auth_none:
            return _redirect("/")
        try:
            who = await self.auth.authenticate(f"Bearer {token}") if token else None
        except AuthUnavailable:
            return self._login_response(503, "cannot check the token right now; try again shortly")
        except ScistreamError:
            who = None
        if who is None:
            log.info("web view: a sign-in from %s was refused", request.remote)
            return self._login_response(401, "that token was not accepted")
        now = time.time()
        for sid in [k for k, (_, exp) in self.logins.items() if exp < now]:
            del self.logins[sid]
        while len(self.logins) >= MAX_LOGINS:
            self.logins.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        self.logins[sid] = (token, now + COOKIE_TTL)
        log.info("web view: %s signed in from %s", who.id, request.remote)
        resp = _redirect("/")
        resp.set_cookie(COOKIE, sid, max_age=COOKIE_TTL, path="/", httponly=True, secure=self.secure,
                        samesite="Strict")
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        if not self._same_origin(request):
            raise web.HTTPForbidden(text="cross-site logout refused\n")
        self.logins.pop(request.cookies.get(COOKIE, ""), None)
        resp = _redirect("/login")
        resp.del_cookie(COOKIE, path="/", secure=self.secure, samesite="Strict")
        return resp

    async def static(self, request: web.Request) -> web.Response:
        rel = request.match_info["path"]
        parts = rel.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise web.HTTPNotFound()
        found = self._files.get(rel)
        if found is None:
            node = STATIC.joinpath(*parts)
            ctype = STATIC_TYPES.get(Path(rel).suffix)
            if ctype is None or not node.is_file():
                raise web.HTTPNotFound()
            found = self._files[rel] = (node.read_bytes(), ctype)   # a few small files, read once
        return web.Response(body=found[0], headers={"Content-Type": found[1], "Cache-Control": "max-age=3600"})

    # -- JSON and events -----------------------------------------------------------------
    async def api_sessions(self, request: web.Request) -> web.Response:
        who = await self._viewer(request, False)
        return web.json_response(self.table(who))

    async def api_session(self, request: web.Request) -> web.Response:
        who = await self._viewer(request, False)
        s = self.find(who, request.match_info["uid"], request.match_info["role"])
        return web.json_response(self.one(s, history=True))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """One event a second: ``{now, summary, sessions}``, or with ?uid=&role= one session
        (its first event carries the chart's history)."""
        who = await self._viewer(request, False)
        uid, role = request.query.get("uid"), request.query.get("role")
        target = self.find(who, uid, role or "") if uid else None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        self._viewers += 1
        self._wanted.set()
        checked = time.monotonic()
        first = True
        try:
            while not self._closing.is_set():
                if target is not None:
                    fresh = self.registry.active.get((target.uid, target.role))
                    if fresh is not None and fresh.created == target.created:
                        target = fresh
                    payload = self.one(target, history=first)
                else:
                    payload = self.table(who)
                first = False
                await resp.write(f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode())
                async with self._tick:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._tick.wait(), SAMPLE_EVERY * 3)
                if not self.auth_none and time.monotonic() - checked > REAUTH_EVERY:
                    checked = time.monotonic()
                    try:
                        still = await self.identity(request)
                    except web.HTTPException:   # the identity provider is down: keep going
                        still = who
                    if still != who:
                        await resp.write(b"event: signed-out\ndata: {}\n\n")
                        break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(task)
            self._viewers -= 1
            if not self._viewers:
                self._wanted.clear()
        return resp


# -- HTML ---------------------------------------------------------------------------------
def _e(v: Any) -> str:
    return html.escape(str(v))


def _summary_html(sm: dict[str, Any]) -> str:
    bw = (f"{sm['bandwidth_used_kbps']} / {sm['bandwidth_max_kbps']} kbit/s" if sm["bandwidth_max_kbps"]
          else f"{sm['bandwidth_used_kbps']} kbit/s (no cap)")
    states = " ".join(f'<span class="state s-{_e(k)}">{_e(k)} <b id="n-{_e(k)}">{v}</b></span>'
                      for k, v in sm["states"].items())
    return (f'<section id="summary"><div><span class="label">ports in use</span> '
            f'<b id="ports">{sm["ports_used"]} / {sm["ports_total"]}</b></div>'
            f'<div><span class="label">bandwidth admitted</span> <b id="bandwidth">{_e(bw)}</b></div>'
            f'<div><span class="label">sessions</span> {states}</div>{_nodes_html(sm)}</section>')


def _nodes_html(sm: dict[str, Any]) -> str:
    """A facility's nodes: name, state, sessions."""
    if "nodes" not in sm:
        return ""
    items = " ".join(f'<span class="node n-{_e(n["state"])}" data-node="{_e(n["name"])}">{_e(n["name"])} '
                     f'{_e(n["state"])} <b>{n["sessions"]}</b></span>' for n in sm["nodes"])
    return f'<div id="nodes"><span class="label">nodes</span> {items or "none registered"}</div>'


def _row_html(r: dict[str, Any]) -> str:
    html_of = {"uid": f'<a href="{_e(r["url"])}">{_e(r["uid"])}</a>',
               "state": f'<span class="state s-{_e(r["state"])}">{_e(r["state"])}</span>'}
    cells = "".join(f'<td class="c-{key}">{html_of.get(key) or _e(r[key])}</td>' for key, _ in COLUMNS)
    err = f' title="{_e(r["last_error"])}"' if r["last_error"] else ""
    return f'<tr data-key="{_e(r["uid"])}/{_e(r["role"])}"{err}>{cells}</tr>'


def _index_body(data: dict[str, Any]) -> str:
    head = "".join(f'<th class="c-{k}">{_e(label)}</th>' for k, label in COLUMNS)
    rows = "".join(_row_html(r) for r in data["sessions"])
    empty = "" if data["sessions"] else '<p id="empty">no sessions visible to you on this server</p>'
    return (_summary_html(data["summary"]) +
            f'<table id="sessions"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{empty}')


_HOP_KEYS = ("producer", "a_lan", "wan", "b_lan", "consumer")


def _chain_html(c: dict[str, Any]) -> str:
    """Producer, A's LAN, WAN, B's LAN, consumer: each hop with its rate and round trip (as
    this gateway sees them), the one holding the session back marked (app.js redraws it)."""
    items = "".join(
        f'<li class="hop{" bottleneck" if key == c["hop"] else ""}" data-hop="{key}">'
        f'<span class="name">{_e(h["hop"])}</span> <span class="rate">{_e(h["rate_h"])}</span> '
        f'<span class="rtt">{_e(h["rtt_h"])}</span></li>' for key, h in zip(_HOP_KEYS, c["hops"]))
    return f'<ol id="chain">{items}</ol><p id="bottleneck">{_e(c["bottleneck"])}</p>'


def _session_body(d: dict[str, Any]) -> str:
    r = d["session"]
    facts = [("state", f'<span class="state s-{_e(r["state"])}" id="state">{_e(r["state"])}</span>'),
             ("owner", _e(r["owner"])), ("age", f'<span id="age">{_e(r["age"])}</span>'),
             ("lease left", f'<span id="lease">{_e(r["lease_left"])}</span>'),
             ("connections open / total", f'<span id="conns">{_e(r["conns"])}</span>'),
             ("to producer", f'<span id="rate-in" data-bps="{r["rate_in"]}">{_e(r["rate_in_h"])}</span>'),
             ("to consumer", f'<span id="rate-out" data-bps="{r["rate_out"]}">{_e(r["rate_out_h"])}</span>'),
             ("bytes to producer / consumer",
              f'<span id="bytes" title="{r["bytes_in"]} / {r["bytes_out"]} bytes">'
              f'{_e(r["bytes_in_h"])} / {_e(r["bytes_out_h"])}</span>'),
             ("WAN leg", _e(r["wan_security"])),
             ("UDP", f'<span id="udp" class="udp-{_e(r["udp"] or "none")}">{_e(r["udp_h"])}</span>'),
             ("data server", _e(r["server_type"])),
             ("node", _e(r["node"]))]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    tl = "".join(f'<li><span class="state s-{_e(t["state"])}">{_e(t["state"])}</span> '
                 f'<time>{_e(t["when"])}</time></li>' for t in d["timeline"])
    return (f'<p><a href="/">&larr; all sessions</a></p><h1>session <code>{_e(r["uid"])}</code> '
            f'{_e(r["role"])}</h1><div class="cols"><dl id="facts">{dl}</dl>'
            f'<div><h2>Throughput</h2><div id="chart"></div></div></div>'
            f'<h2>Chain</h2>{_chain_html(d["chain"])}'
            f'<h2>Timeline</h2><ol id="timeline">{tl}</ol>'
            f'<h2>Last error</h2><pre id="last-error">{_e(r["last_error"] or "none")}</pre>')
