"""optuna-dashboard over the study store, with the artifact store wired in, safe to expose.

optuna-dashboard has no authentication, and some of its endpoints write: tell a trial, delete a
study, edit notes. So `tuner dashboard` binds to the loopback address, and binding to any other
address needs `read_only` (every write request is refused) or a `token` (every request must
carry it). Writes from another site's page (a browser on the same machine) are refused by
checking their Origin against the Host they were sent to.

In every mode the dashboard answers only to its own names (`Hosts`): a page that DNS rebinding
pointed at it carries its own name in the Host header, and is refused (421) before it can read
or write anything. A study is deleted through tuner's delete (tuner/store/_deletion.py), which
refuses a study whose trials run.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import re
import socketserver
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urlsplit

from tuner.common import extras
from tuner.common.errors import TunerError
from tuner.store import open_storage, resolve_url

logger = logging.getLogger(__name__)

TOKEN_COOKIE = "tuner_dashboard_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::"})  # bound to every interface
# A host name or IPv4 address; a Host header is one, or an IPv6 address in brackets, and a port.
_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_HOST = re.compile(rf"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>{_NAME.pattern}))(?::[0-9]{{1,5}})?")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


@dataclass(frozen=True)
class Access:
    """Who may do what: `read_only` refuses writes; `token` is required on every request."""

    read_only: bool = False
    token: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class Hosts:
    """The names the dashboard answers to: a request whose Host header names anything else is
    refused. The port is not compared: a tunnel or a published container port changes it, and a
    rebinding page has to use the dashboard's own port anyway; what it cannot choose is its name.

    A loopback bind answers to 127.0.0.1, localhost and [::1]; a bind to one address or name, to
    that; a bind to every interface (0.0.0.0, ::) to any IP address and localhost, since a
    rebinding page never has an address for its name. Plus the names of `--allow-host`."""

    names: frozenset[str]
    any_address: bool = False

    @classmethod
    def for_bind(cls, host: str, allow: Iterable[str] = ()) -> Hosts:
        names = {_normal(host)} | {check_allow_host(name) for name in allow}
        if host in WILDCARDS or is_loopback(host):
            names |= LOOPBACK_NAMES
        return cls(frozenset(names), any_address=host in WILDCARDS)

    def admits(self, header: str) -> bool:
        name = host_of(header)
        if name is None:
            return False
        return name in self.names or (self.any_address and _is_address(name))

    def shown(self) -> str:
        names = [f"[{n}]" if ":" in n else n for n in sorted(self.names - WILDCARDS)]
        return ", ".join(names + ["any IP address"] * self.any_address)


def host_of(header: str) -> str | None:
    """The name a Host header carries, lower case, without port or trailing dot; None when it
    is not a host at all (empty, user info, a path, spaces)."""
    match = _HOST.fullmatch(header)
    if match is None:
        return None
    if match["v6"] is not None:
        try:
            return ipaddress.IPv6Address(match["v6"]).compressed
        except ValueError:
            return None
    return _normal(match["name"].rstrip("."))


def check_allow_host(name: str) -> str:
    """An `--allow-host` value: one host name or address, no port, no wildcard."""
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if _is_address(bare):
        if _normal(bare) not in WILDCARDS:
            return _normal(bare)
    elif _NAME.fullmatch(name):
        return _normal(name.rstrip("."))
    raise TunerError(
        f"--allow-host {name!r}: give one host name or address the dashboard is reached by, "
        "without a port or wildcard (e.g. --allow-host tuner.example.com)"
    )


def _normal(host: str) -> str:
    host = host.strip("[]").lower()
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_exposure(host: str, access: Access) -> None:
    """Refuse to serve an unauthenticated dashboard that can write to anything but loopback."""
    if access.token is not None and len(access.token) < 16:
        raise TunerError("--token must be at least 16 characters (try: openssl rand -hex 16)")
    if not is_loopback(host) and not access.read_only and access.token is None:
        raise TunerError(
            f"--host {host} serves the dashboard beyond this machine, and optuna-dashboard has "
            "no authentication of its own: add --read-only (write requests refused) or "
            "--token (every request must carry it), or keep --host 127.0.0.1"
        )


def build_app(
    storage: str | None = None,
    *,
    access: Access = Access(),
    hosts: Hosts = Hosts(LOOPBACK_NAMES),
) -> WSGIApp:
    """The WSGI app: optuna-dashboard on the store, answering to `hosts`, guarded by `access`."""
    extras.require("dashboard", what="the dashboard")
    url = resolve_url(storage)
    # A viewer makes no SQLite file (a dashboard started in the wrong folder says so). A database
    # that exists is the operator's, made for tuner: a dashboard service starts beside it before
    # the first study (compose, Kubernetes), so it gets Optuna's tables rather than an error.
    store = open_storage(url, must_exist=url.startswith("sqlite"))
    import optuna_dashboard  # after: no store is said without loading the dashboard first

    artifacts = StudyArtifacts(store, url)
    app = optuna_dashboard.wsgi(store, artifact_store=artifacts)
    return Guard(StudyDelete(artifacts.routed(app), store, url), access, hosts)


def serve(
    storage: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    access: Access = Access(),
    allow_hosts: Iterable[str] = (),
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted; `on_ready` gets the address once the port is bound.
    `allow_hosts`: names it answers to besides its own address (a proxy's, a service's)."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    check_exposure(host, access)
    hosts = Hosts.for_bind(host, allow_hosts)
    app = build_app(storage, access=access, hosts=hosts)

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        # The page fetches plots and trials in parallel; one slow request must not block all.
        daemon_threads = True
        allow_reuse_address = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            # Request lines carry the token when a browser first opens `?token=`.
            logger.debug("%s %s", self.address_string(), _without_token(format % args))

    try:
        server = make_server(host, port, app, server_class=Server, handler_class=Quiet)
    except OSError as e:
        raise TunerError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    shown = f"[{host}]" if ":" in host else host
    if on_ready is not None:
        on_ready(f"http://{shown}:{server.server_port}/dashboard")
    with server:
        server.serve_forever()


class Guard:
    """WSGI middleware enforcing `Hosts`, then `Access`, in front of optuna-dashboard."""

    def __init__(self, app: WSGIApp, access: Access, hosts: Hosts) -> None:
        self.app = app
        self.access = access
        self.hosts = hosts

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        host = environ.get("HTTP_HOST", "")
        if not self.hosts.admits(host):
            # First, in every mode: a rebound page gets nothing, not even a token's cookie.
            return _refuse(
                start_response,
                "421 Misdirected Request",
                f"this dashboard answers to {self.hosts.shown()}, not Host {host[:100]!r}; "
                "to reach it by another name, start it with --allow-host NAME",
            )
        if self.access.token is not None:
            query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
            if "token" in query and _same(query["token"], self.access.token):
                return self._set_cookie_and_redirect(environ, query, start_response)
            if not self._authorised(environ):
                return _refuse(
                    start_response,
                    "401 Unauthorized",
                    "this dashboard needs its token: open it once with ?token=..., or send "
                    "the header 'Authorization: Bearer ...'",
                )
        if method not in SAFE_METHODS:
            if self.access.read_only:
                return _refuse(
                    start_response, "403 Forbidden", "this dashboard is read-only (--read-only)"
                )
            if not _same_origin(environ):
                return _refuse(start_response, "403 Forbidden", "cross-origin write refused")
        return self.app(environ, start_response)

    def _authorised(self, environ: dict) -> bool:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header.startswith("Bearer ") and _same(
            header.removeprefix("Bearer "), self.access.token
        ):
            return True
        cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        morsel = cookie.get(TOKEN_COOKIE)
        return morsel is not None and _same(morsel.value, self.access.token)

    def _set_cookie_and_redirect(
        self, environ: dict, query: dict[str, str], start_response: Callable
    ) -> list[bytes]:
        # The token leaves the address bar (and the history, and Referer headers) at once.
        rest = urlencode({k: v for k, v in query.items() if k != "token"})
        location = environ.get("PATH_INFO", "/") + (f"?{rest}" if rest else "")
        cookie = f"{TOKEN_COOKIE}={self.access.token}; Path=/; HttpOnly; SameSite=Strict"
        start_response("303 See Other", [("Location", location), ("Set-Cookie", cookie)])
        return [b""]


class StudyDelete:
    """`DELETE /api/studies/SID` (the dashboard's Delete button) through tuner's delete, not
    optuna-dashboard's, which removes the artifacts first and reports 204 whether or not the
    rows went: a study whose trials run is refused (409, naming them), and one that outlived
    the delete says so (500). A study tuner did not make (no stored space) is optuna-dashboard's
    to delete."""

    _PATH = re.compile(r"^/api/studies/(\d+)/?$")

    def __init__(self, app: WSGIApp, store: Any, url: str) -> None:
        self.app = app
        self.store = store
        self.url = url

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        match = self._PATH.match(environ.get("PATH_INFO", ""))
        if match is None or environ.get("REQUEST_METHOD", "").upper() != "DELETE":
            return self.app(environ, start_response)
        from tuner.store import attrs, deletion

        try:
            name = self.store.get_study_name_from_id(int(match[1]))
            if attrs.SPACE not in self.store.get_study_user_attrs(int(match[1])):
                return self.app(environ, start_response)
        except KeyError:
            return _refuse(start_response, "404 Not Found", f"study_id={match[1]} is not found")
        try:
            deletion.delete(name, self.url)
        except deletion.StudyInUse as e:
            return _refuse(start_response, "409 Conflict", str(e))
        except TunerError as e:
            return _refuse(start_response, "500 Internal Server Error", str(e))
        start_response("204 No Content", [])
        return [b""]


def _same(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _same_origin(environ: dict) -> bool:
    origin = environ.get("HTTP_ORIGIN")
    if not origin:
        return True  # not sent by a browser's cross-site request (curl, scripts, same-site)
    return urlsplit(origin).netloc == environ.get("HTTP_HOST", "")


def _refuse(start_response: Callable, status: str, reason: str) -> list[bytes]:
    body = json.dumps({"reason": reason}).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def _without_token(text: str) -> str:
    return re.sub(r"token=[^&\s]*", "token=***", text)


class StudyArtifacts:
    """Each study's own artifact store, as the one store optuna-dashboard takes.

    optuna-dashboard hands the store an artifact id only, but every artifact request names its
    study in the path (`/artifacts/SID/...`, `/api/artifacts/SID/...`, `DELETE /api/studies/SID`):
    `routed` notes that study for the request's thread, and the store of its location (a folder
    or S3) serves it. A request with no study (none today) looks in every location.
    """

    _STUDY_IN_PATH = re.compile(r"^/(?:api/)?(?:artifacts|studies)/(\d+)(?:/|$)")

    def __init__(self, store: Any, url: str) -> None:
        self._store = store
        self._url = url
        self._request = threading.local()
        self._opened: dict[str, Any] = {}

    def routed(self, app: WSGIApp) -> WSGIApp:
        def serve(environ: dict, start_response: Callable) -> Iterable[bytes]:
            match = self._STUDY_IN_PATH.match(environ.get("PATH_INFO", ""))
            self._request.study_id = int(match[1]) if match else None
            return app(environ, start_response)

        return serve

    def _open(self, location: str) -> Any:
        from tuner.store import open_artifacts

        if location not in self._opened:
            self._opened[location] = open_artifacts(location)
        return self._opened[location]

    def _stores(self) -> list[Any]:
        from tuner.store import study_location

        study_id = getattr(self._request, "study_id", None)
        if study_id is not None:
            with contextlib.suppress(KeyError):
                attrs = self._store.get_study_user_attrs(study_id)
                return [self._open(study_location(attrs, self._url))]
        locations = {study_location(s.user_attrs, self._url) for s in self._store.get_all_studies()}
        return [self._open(location) for location in sorted(locations)]

    def open_reader(self, artifact_id: str) -> BinaryIO:
        from optuna.artifacts.exceptions import ArtifactNotFound

        for store in self._stores():
            try:
                return store.open_reader(artifact_id)
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"no artifact {artifact_id}")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        from optuna.artifacts.exceptions import ArtifactNotFound

        stores = self._stores()
        if not stores:
            raise ArtifactNotFound("no study to store the artifact in")
        stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        from optuna.artifacts.exceptions import ArtifactNotFound

        for store in self._stores():
            try:
                store.remove(artifact_id)
                return
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"no artifact {artifact_id}")
