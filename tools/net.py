"""Outbound HTTP that cannot be turned against our own network (server-side request forgery).

A URL is parsed strictly (:func:`parse_url_strict`: http and https only, no user name or
password, no odd IPv4 spellings such as ``0x7f000001``), its host is resolved once and every
address must be a public internet address (:func:`resolve_public`), and the connection goes to
the address that was checked — never to a second lookup of the name, so a name cannot resolve
to a public address for the check and to a private one for the connection. Redirects are
followed by hand and every hop is checked again (:func:`guarded_request`). Hosts named in
``TOOLEXEC_HTTP_ALLOWED_HOSTS`` skip the address check (tests, development), never the URL
checks.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import certifi
from django.conf import settings
from urllib3 import HTTPConnectionPool, HTTPResponse, HTTPSConnectionPool, Timeout
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatch

from .errors import InputInvalid, UpstreamError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Of the whole URL, query parameters and redirect locations included.
MAX_URL_LENGTH = 8192
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Dropped from the request once a redirect leaves the origin the caller asked for.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
USER_AGENT = "toolexec-http-request/1.0"
_CHUNK_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}

_DOTTED_QUAD = re.compile(r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$")
# A last label that is a number (decimal, or hexadecimal with 0x) makes the host an IPv4
# address for browsers and C resolvers alike (WHATWG URL "ends in a number").
_NUMERIC_LABEL = re.compile(r"^(\d+|0x[0-9a-f]*)$")
_IPV4_CHARACTERS = re.compile(r"^[0-9a-fx.]+$")
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
# RFC 6761: these names always mean this machine.
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class DestinationRefused(InputInvalid):
    """The URL (or a redirect from it) leads somewhere http-request may not go.

    The URL is the caller's input, so this is INPUT_INVALID naming ``url``; ``reason`` is the
    words without the field, for messages that wrap it.
    """

    def __init__(self, reason: str, *, message: str = "") -> None:
        self.reason = reason
        super().__init__(message or f"The URL is not allowed: {reason}", field_errors={"url": [reason]})


@dataclass(frozen=True)
class Target:
    """A URL that passed :func:`parse_url_strict`, in the pieces a connection needs."""

    scheme: str
    host: str  # a lower-case host name without a trailing dot, or an IP address without brackets
    port: int
    path: str  # path and query: what goes on the request line
    address: IPAddress | None  # the host, when it is an IP address

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.address, ipaddress.IPv6Address) else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.path}"


@dataclass(frozen=True)
class GuardedResponse:
    status_code: int
    headers: dict[str, str]
    body: bytes
    truncated: bool  # the body was cut at max_bytes
    url: str  # the URL that answered, after redirects
    elapsed_ms: int


# --- URLs and addresses -------------------------------------------------------------------


def parse_url_strict(url: str) -> Target:
    """``url`` in pieces, or DestinationRefused saying what is wrong with it.

    Refuses schemes other than http and https, user names and passwords in the URL, spaces,
    control characters and backslashes, and IPv4 addresses spelled any way but four decimal
    numbers (``2130706433``, ``0x7f000001``, ``0177.0.0.1`` and ``127.1`` all mean 127.0.0.1).
    Does not look at where the host points: see :func:`destination_check`.
    """
    if not isinstance(url, str) or not url:
        raise DestinationRefused("Must be an absolute URL starting with http:// or https://.")
    if len(url) > MAX_URL_LENGTH:
        raise DestinationRefused(f"Must be at most {MAX_URL_LENGTH} characters long.")
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise DestinationRefused("Must not contain spaces or control characters; percent-encode them.")
    if "\\" in url:
        raise DestinationRefused("Must not contain backslashes.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DestinationRefused("Is not a valid URL: check the host and the port.") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise DestinationRefused("Must be an absolute URL starting with http:// or https://.")
    if scheme not in _DEFAULT_PORTS:
        raise DestinationRefused(f"Only http and https URLs can be requested, not {scheme}.")
    if "@" in parts.netloc:
        raise DestinationRefused("Must not contain a user name or password; map a credential to the AUTH slot instead.")
    if port == 0:
        raise DestinationRefused("Port 0 cannot be requested.")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise DestinationRefused("Must name a host, as in https://api.example.com/path.")
    host, address = _host_parse(raw_host, bracketed=parts.netloc.startswith("["))
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return Target(scheme=scheme, host=host, port=port or _DEFAULT_PORTS[scheme], path=path, address=address)


def _host_parse(raw: str, *, bracketed: bool) -> tuple[str, IPAddress | None]:
    if bracketed:
        try:
            v6 = ipaddress.IPv6Address(raw)
        except ValueError:
            raise DestinationRefused(f"The host [{raw}] is not a valid IPv6 address.") from None
        if v6.scope_id:
            raise DestinationRefused("IPv6 addresses with a zone (%…) cannot be requested.")
        return str(v6), v6
    name = raw.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if _NUMERIC_LABEL.match(labels[-1]) or _inet_aton_accepts(name):
        if not _DOTTED_QUAD.match(name):
            if not _IPV4_CHARACTERS.match(name):
                raise DestinationRefused(f"The host {raw} is not a valid host name: its last part is a number.")
            raise DestinationRefused(
                f"The host {raw} is an IPv4 address in an unusual spelling; "
                "write it as four decimal numbers without leading zeros, as in 93.184.215.14."
            )
        v4 = ipaddress.IPv4Address(name)
        return str(v4), v4
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise DestinationRefused(f"The host {raw} is not a valid host name.") from None
    if len(ascii_name) > 253 or not all(_HOST_LABEL.match(label) for label in ascii_name.split(".")):
        raise DestinationRefused(f"The host {raw} is not a valid host name.")
    return ascii_name, None


def _inet_aton_accepts(name: str) -> bool:
    try:
        socket.inet_aton(name)
    except (OSError, ValueError):
        return False
    return True


def address_refusal(address: IPAddress) -> str | None:
    """Why ``address`` may not be reached, in words ("a loopback address"); None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"an IPv4-mapped IPv6 address (of {address.ipv4_mapped})"
        if address.sixtofour is not None:
            embedded = address_refusal(address.sixtofour)
            if embedded:
                return f"a 6to4 address wrapping {address.sixtofour}, {embedded}"
        if address.teredo is not None:
            return "a Teredo tunnel address"
        if address in _NAT64:
            # DNS64 gives IPv6-only hosts these for every IPv4-only name: fine when the
            # IPv4 address inside is public.
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            embedded = address_refusal(inner)
            return f"a NAT64 address wrapping {inner}, {embedded}" if embedded else None
        if address.is_site_local:
            return "a site-local address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (where cloud metadata services live)"
    if address.is_multicast:
        return "a multicast address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private network address"
    if not address.is_global:
        return "not a public internet address"
    return None


def allowed_hosts_setting() -> frozenset[str]:
    return frozenset(_host_key(h) for h in getattr(settings, "TOOLEXEC_HTTP_ALLOWED_HOSTS", ()) if h.strip())


def _host_key(host: str) -> str:
    return host.strip().lower().strip("[]").rstrip(".")


def destination_check(target: Target, *, allowed_hosts: Iterable[str] | None = None) -> None:
    """Refuse, before any lookup, a URL whose host is an IP address that is not public or a
    name that always means this machine; hosts in the allow-list pass."""
    allowed = allowed_hosts_setting() if allowed_hosts is None else frozenset(map(_host_key, allowed_hosts))
    if target.host in allowed:
        return
    if target.address is not None:
        reason = address_refusal(target.address)
        if reason:
            raise DestinationRefused(f"{target.address} is {reason}; only public internet addresses can be reached.")
    elif target.host in _LOOPBACK_NAMES or target.host.endswith(".localhost"):
        raise DestinationRefused(f"{target.host} is this server itself; only public internet addresses can be reached.")


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise UpstreamError("the host name could not be found (the DNS lookup failed).", provider=host) from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UpstreamError("the host name has no address to connect to.", provider=host)
    return addresses


def resolve_public(host: str, port: int) -> list[str]:
    """The addresses of ``host``, each of them checked to be public; DestinationRefused if any
    is not (a name pointing at a private address among public ones is refused too)."""
    addresses = _resolve(host, port)
    for address in addresses:
        reason = address_refusal(address)
        if reason:
            raise DestinationRefused(
                f"{host} resolves to {address}, {reason}; only public internet addresses can be reached."
            )
    return [str(a) for a in addresses]


def _addresses_for(target: Target, allowed: frozenset[str]) -> list[str]:
    destination_check(target, allowed_hosts=allowed)
    if target.address is not None:
        return [str(target.address)]
    if target.host in allowed:
        return [str(a) for a in _resolve(target.host, target.port)]
    return resolve_public(target.host, target.port)


# --- the request --------------------------------------------------------------------------


def guarded_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
    max_bytes: int | None = None,
    max_redirects: int = MAX_REDIRECTS,
    allowed_hosts: Iterable[str] | None = None,
    credential_headers: Iterable[str] = (),
    check_stop: Callable[[], None] | None = None,
    ca_certs: str | None = None,
) -> GuardedResponse:
    """Send one request to a public address and follow up to ``max_redirects`` redirects,
    checking every hop; read at most ``max_bytes`` of the final body (``truncated`` says so).

    ``timeout`` bounds the whole exchange (connecting, waiting, reading, every hop). The target's
    own answer, whatever its status, is the result; only a failure to get one is an error:
    DestinationRefused (INPUT_INVALID) for a refused destination, UpstreamError in words for DNS,
    connection, TLS, protocol and time-out failures. ``credential_headers`` (beside
    Authorization, Proxy-Authorization and Cookie) are dropped once a redirect leaves the
    origin of ``url``. ``check_stop`` is called between steps (ExecutionContext.check_cancelled).
    """
    started = time.monotonic()
    deadline = started + timeout
    allowed = allowed_hosts_setting() if allowed_hosts is None else frozenset(map(_host_key, allowed_hosts))
    limit = max_bytes if max_bytes is not None else settings.TOOLEXEC_HTTP_MAX_RESPONSE_BYTES
    stop = check_stop or (lambda: None)
    sensitive = CREDENTIAL_HEADERS | {h.lower() for h in credential_headers}
    request_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "host"}
    if not any(k.lower() == "user-agent" for k in request_headers):
        request_headers["User-Agent"] = USER_AGENT
    method = method.upper()

    target = parse_url_strict(url)
    first_origin = target.origin
    previous: Target | None = None
    for hop in range(max_redirects + 1):
        stop()
        try:
            addresses = _addresses_for(target, allowed)
        except DestinationRefused as exc:
            if previous is None:
                raise
            raise _redirect_refused(previous, target.url, exc.reason) from None
        pool, response = _open(target, addresses, method, request_headers, body, deadline, timeout, ca_certs)
        try:
            location = response.headers.get("location")
            if response.status not in REDIRECT_STATUSES or not location:
                data, truncated = _read_body(response, target, deadline, timeout, limit, stop)
                return GuardedResponse(
                    status_code=response.status,
                    headers=dict(response.headers),
                    body=data,
                    truncated=truncated,
                    url=target.url,
                    elapsed_ms=int((time.monotonic() - started) * 1000),
                )
            status = response.status
        finally:
            response.close()
            pool.close()
        if hop == max_redirects:
            raise UpstreamError(
                f"it redirected more than {max_redirects} times, so the redirects were not followed further.",
                provider=target.host,
            )
        next_url = urljoin(target.url, location)
        try:
            next_target = parse_url_strict(next_url)
        except DestinationRefused as exc:
            raise _redirect_refused(target, next_url, exc.reason) from None
        if status == 303 or (status in (301, 302) and method == "POST"):
            # What browsers do: the next request is a GET without the body.
            method = "GET" if method != "HEAD" else method
            body = None
            request_headers = {
                k: v for k, v in request_headers.items() if k.lower() not in ("content-type", "content-length")
            }
        if next_target.origin != first_origin:
            request_headers = {k: v for k, v in request_headers.items() if k.lower() not in sensitive}
        previous, target = target, next_target
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _redirect_refused(source: Target, location: str, reason: str) -> DestinationRefused:
    if len(location) > 200:
        location = location[:200] + "…"
    words = f"{source.host} redirected to {location}, which cannot be followed: {reason}"
    return DestinationRefused(words, message=words)


def _pool(target: Target, address: str, ca_certs: str | None) -> HTTPConnectionPool:
    if target.scheme == "https":
        # Connect to the checked address; verify the certificate for the name (SNI too).
        return HTTPSConnectionPool(
            host=address,
            port=target.port,
            maxsize=1,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_certs or certifi.where(),
            server_hostname=target.host,
            assert_hostname=target.host,
        )
    return HTTPConnectionPool(host=address, port=target.port, maxsize=1, retries=False)


def _open(
    target: Target,
    addresses: list[str],
    method: str,
    headers: dict[str, str],
    body: bytes | None,
    deadline: float,
    timeout: float,
    ca_certs: str | None,
) -> tuple[HTTPConnectionPool, HTTPResponse]:
    """Connect to the first of ``addresses`` that answers and send the request; returns the
    response with its body unread."""
    refused: NewConnectionError | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        pool = _pool(target, address, ca_certs)
        try:
            response = pool.urlopen(
                method,
                target.path,
                body=body,
                headers={**headers, "Host": target.host_header},
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                timeout=Timeout(connect=remaining, read=remaining),
            )
        except NewConnectionError as exc:  # the next address may answer
            pool.close()
            refused = exc
            continue
        except HTTPError as exc:
            pool.close()
            raise _transport_error(exc, target, timeout) from None
        return pool, response  # type: ignore[return-value]
    if refused is not None:
        raise _transport_error(refused, target, timeout) from None
    raise _timed_out(target, timeout)


def _read_body(
    response: HTTPResponse,
    target: Target,
    deadline: float,
    timeout: float,
    limit: int,
    stop: Callable[[], None],
) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the (decoded) body and whether there was more."""
    fired = threading.Event()

    def cut_off() -> None:
        # Unblocks a read waiting on a server that sends slowly or not at all.
        fired.set()
        try:
            response.shutdown()
        except (OSError, RuntimeError, ValueError):
            pass  # the body was complete and the connection already let go

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut_off)
    watchdog.daemon = True
    watchdog.start()
    chunks: list[bytes] = []
    total = 0
    truncated = False
    try:
        while True:
            stop()
            chunk = response.read(_CHUNK_BYTES)
            if not chunk:
                break
            if total + len(chunk) > limit:
                chunks.append(chunk[: limit - total])
                truncated = True
                break
            chunks.append(chunk)
            total += len(chunk)
    except HTTPError as exc:
        if fired.is_set():
            raise _timed_out(target, timeout) from None
        raise _transport_error(exc, target, timeout) from None
    finally:
        watchdog.cancel()
    if fired.is_set() and not truncated:
        raise _timed_out(target, timeout)
    return b"".join(chunks), truncated


def _seconds(value: float) -> str:
    return f"{value:g} second" + ("" if value == 1 else "s")


def _timed_out(target: Target, timeout: float) -> UpstreamError:
    return UpstreamError(f"it did not answer completely within {_seconds(timeout)}.", provider=target.host)


def _transport_error(exc: HTTPError, target: Target, timeout: float) -> UpstreamError:
    """A urllib3 failure in words, without paths, addresses of our own or exception dumps."""
    host, port = target.host, target.port
    if isinstance(exc, NewConnectionError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConnectionRefusedError):
            detail = f"the connection to port {port} was refused (nothing is listening there)."
        elif isinstance(cause, OSError) and cause.strerror:
            detail = f"the connection to port {port} failed: {cause.strerror.rstrip('.').lower()}."
        else:
            detail = f"the connection to port {port} failed."
    elif isinstance(exc, ConnectTimeoutError):
        detail = f"it did not accept a connection within {_seconds(timeout)}."
    elif isinstance(exc, ReadTimeoutError):
        detail = f"it did not answer within {_seconds(timeout)}."
    elif isinstance(exc, SSLError):
        detail = f"a secure connection could not be made: {_tls_reason(exc, host)}."
    elif isinstance(exc, DecodeError):
        detail = "it sent a compressed body that could not be decompressed."
    elif isinstance(exc, ProtocolError):
        detail = "the connection broke off before a complete answer arrived."
    else:
        detail = "the request failed before an answer arrived."
    return UpstreamError(detail, provider=host)


def _tls_reason(exc: SSLError, host: str) -> str:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"its certificate was not accepted ({current.verify_message})"
        if isinstance(current, ssl.CertificateError | HostnameMismatch):
            return f"its certificate is not valid for {host}"
        nested = [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        current = nested[0] if nested else current.__cause__ or current.__context__
    return "the TLS handshake failed"
