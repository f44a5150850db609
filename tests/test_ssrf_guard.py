"""The server-side request forgery guard of http-request (tools/net.py): internal destinations
are refused before anything connects to them — as literal addresses, odd spellings, names that
resolve inward, and redirects — and the connection goes to the address that was checked.

No test here sends traffic anywhere but 127.0.0.1: connections are recorded and refused by the
``network`` fixture, and names other than localhost resolve through its fake DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3.util.connection
from pytest_httpserver import HTTPServer
from rest_framework.test import APIClient

from core.errors import ErrorCode
from executions.models import Execution
from tools import net
from tools.builtin.http_request import HttpRequest
from tools.errors import UpstreamError

pytestmark = pytest.mark.django_db

PUBLIC_ADDRESS = "93.184.215.14"  # what the fake DNS gives public names; never really connected to


class Network:
    """Records every connection attempt and DNS lookup; refuses connections to anything but
    127.0.0.1 and answers lookups of names in ``dns`` (others fail, as an unknown name would)."""

    def __init__(self, real_connect: Any, real_getaddrinfo: Any) -> None:
        self.connections: list[tuple[str, int]] = []
        self.lookups: list[str] = []
        self.dns: dict[str, list[str]] = {}
        self._real_connect = real_connect
        self._real_getaddrinfo = real_getaddrinfo

    def create_connection(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        self.connections.append((address[0], address[1]))
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(111, "Connection refused (by the test)")
        return self._real_connect(address, *args, **kwargs)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.lookups.append(name)
        if name in self.dns:
            return [
                (
                    socket.AF_INET6 if ":" in a else socket.AF_INET,
                    socket.SOCK_STREAM,
                    socket.IPPROTO_TCP,
                    "",
                    (a, port, 0, 0) if ":" in a else (a, port),
                )
                for a in self.dns[name]
            ]
        if name in ("localhost", "127.0.0.1"):
            return self._real_getaddrinfo(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    @property
    def name_lookups(self) -> list[str]:
        """Lookups of host names (connecting to an address looks the address itself up)."""
        return [name for name in self.lookups if not _is_address(name)]

    @property
    def outside_connections(self) -> list[tuple[str, int]]:
        return [c for c in self.connections if c[0] != "127.0.0.1"]


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    spy = Network(urllib3.util.connection.create_connection, socket.getaddrinfo)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", spy.create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", spy.getaddrinfo)
    return spy


@pytest.fixture
def no_allow_list(settings: Any) -> None:
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = []


@pytest.fixture(scope="module")
def server() -> Iterator[HTTPServer]:
    """A test server on 127.0.0.1, reached as http://localhost:<port>/."""
    test_server = HTTPServer(host="127.0.0.1", threaded=True)
    test_server.start()
    yield test_server
    test_server.clear()
    test_server.stop()


@pytest.fixture
def local(server: HTTPServer) -> HTTPServer:
    server.clear()
    return server


def local_url(server: HTTPServer, path: str) -> str:
    return f"http://localhost:{server.port}{path}"


def create_http_instance(api: APIClient) -> str:
    response = api.post(
        "/api/v1/instances/",
        {"tool_definition_id": HttpRequest.slug, "workflow_id": "wf-ssrf", "name": "Outbound"},
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()["id"]


@pytest.fixture
def http_instance(api: APIClient, catalog: Any) -> str:
    return create_http_instance(api)


def execute(api: APIClient, instance_id: str, inputs: dict[str, Any]) -> Any:
    return api.post(f"/api/v1/instances/{instance_id}/execute-sync", inputs, format="json")


# --- the table: refused before any connection -----------------------------------------------

# (url, words the refusal must contain)
REFUSED_URLS = [
    ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://127.0.0.1:8000/admin/", "loopback"),
    ("http://[::1]/", "::1 is a loopback address"),
    ("http://10.0.0.1/", "10.0.0.1 is a private network address"),
    ("http://192.168.1.1/", "private network"),
    ("http://172.16.5.4/", "private network"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://100.64.0.1/", "not a public internet address"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "240.0.0.1 is a reserved address"),
    ("http://0x7f000001/", "unusual spelling"),
    ("http://2130706433/", "unusual spelling"),
    ("http://0177.0.0.1/", "unusual spelling"),
    ("http://127.1/", "unusual spelling"),
    ("http://0x7f.0.0.1/", "unusual spelling"),
    ("http://127.000.000.001/", "unusual spelling"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::ffff:a9fe:a9fe]/", "IPv4-mapped"),
    ("http://[fc00::1]/", "private network"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "zone"),
    ("http://[2002:7f00:1::]/", "6to4 address wrapping 127.0.0.1"),
    ("http://[64:ff9b::a9fe:a9fe]/", "NAT64 address wrapping 169.254.169.254"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
    ("http://localhost/", "localhost is this server itself"),
    ("http://LOCALHOST./", "this server itself"),
    ("http://metadata.localhost/", "this server itself"),
    ("ftp://example.com/file", "Only http and https"),
    ("file:///etc/passwd", "Only http and https"),
    ("gopher://example.com/", "Only http and https"),
    ("//example.com/", "http:// or https://"),
    ("http://user:secret@example.com/", "user name or password"),
    ("https://example.com@127.0.0.1/", "user name or password"),
    ("http://example.com\\@127.0.0.1/", "backslashes"),
    ("http://exa mple.com/", "spaces or control characters"),
    ("http://example.com:0/", "Port 0"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http:///path", "Must name a host"),
]


@pytest.mark.parametrize(("url", "words"), REFUSED_URLS)
def test_guard_refuses_internal_destinations_before_connecting(url, words, network, no_allow_list):
    with pytest.raises(net.DestinationRefused) as refused:
        net.guarded_request("GET", url, timeout=2)

    assert refused.value.code == ErrorCode.INPUT_INVALID
    assert words in refused.value.metadata["field_errors"]["url"][0]
    assert network.connections == []
    assert network.lookups == []  # decided from the URL alone: not even a DNS lookup


@pytest.mark.parametrize(("url", "words"), REFUSED_URLS)
def test_execute_sync_answers_400_naming_url_and_records_nothing(
    url, words, api, http_instance, network, no_allow_list
):
    response = execute(api, http_instance, {"url": url})

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["error_code"] == "INPUT_INVALID"
    assert words in body["metadata"]["field_errors"]["url"][0]
    assert words in body["error_message"]
    assert not Execution.objects.exists()
    assert network.connections == []


# --- names that resolve inward ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("addresses", "words"),
    [
        (["127.0.0.1"], "internal.test resolves to 127.0.0.1, a loopback address"),
        (["10.1.2.3"], "resolves to 10.1.2.3, a private network address"),
        (["169.254.169.254"], "resolves to 169.254.169.254, a link-local address"),
        (["::1"], "resolves to ::1, a loopback address"),
        (["::ffff:10.0.0.1"], "IPv4-mapped"),
        # One inward address among public ones is enough to refuse the name.
        ([PUBLIC_ADDRESS, "10.0.0.8"], "resolves to 10.0.0.8"),
    ],
)
def test_a_name_resolving_inward_is_refused_before_connecting(addresses, words, network, no_allow_list):
    network.dns["internal.test"] = addresses

    with pytest.raises(net.DestinationRefused) as refused:
        net.guarded_request("GET", "http://internal.test/", timeout=2)

    assert words in refused.value.metadata["field_errors"]["url"][0]
    assert network.lookups == ["internal.test"]
    assert network.connections == []


def test_localhost_by_name_is_refused_even_when_it_would_resolve(network, no_allow_list):
    with pytest.raises(net.DestinationRefused, match="localhost is this server itself"):
        net.guarded_request("GET", "http://localhost:8000/", timeout=2)

    assert network.connections == []


def test_a_run_whose_name_resolves_to_loopback_fails_in_words(api, http_instance, network, no_allow_list):
    network.dns["internal.test"] = ["127.0.0.1"]

    response = execute(api, http_instance, {"url": "http://internal.test/admin"})

    assert response.status_code == 200
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "INPUT_INVALID"
    assert "internal.test resolves to 127.0.0.1, a loopback address" in body["error_message"]
    assert body["metadata"]["field_errors"]["url"]
    assert Execution.objects.get().status == Execution.Status.FAILED
    assert network.connections == []


def test_the_connection_goes_to_the_checked_address_without_a_second_lookup(network, no_allow_list):
    # A rebinding DNS would answer the check with a public address and the connection with a
    # private one: the guard asks once and connects to what it checked.
    answers = iter([[PUBLIC_ADDRESS], ["10.0.0.1"], ["10.0.0.1"]])

    def rebinding_lookup(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        network.dns["rebind.test"] = next(answers)
        return Network.getaddrinfo(network, host, port, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", rebinding_lookup)
        with pytest.raises(UpstreamError, match="refused"):  # the test refuses the connection
            net.guarded_request("GET", "http://rebind.test/", timeout=2)

    assert network.lookups == ["rebind.test"]
    assert network.connections == [(PUBLIC_ADDRESS, 80)]


def test_an_allowed_name_is_connected_to_at_its_resolved_address_with_its_own_host_header(network, local):
    network.dns["service.test"] = ["127.0.0.1"]
    local.expect_request("/ping", headers={"Host": f"service.test:{local.port}"}).respond_with_data("pong")

    response = net.guarded_request("GET", f"http://service.test:{local.port}/ping", allowed_hosts=["service.test"])

    assert response.status_code == 200
    assert response.body == b"pong"
    assert network.name_lookups == ["service.test"]
    assert network.connections == [("127.0.0.1", local.port)]
    local.check_assertions()


def test_when_one_address_refuses_the_next_one_is_tried(network, local):
    network.dns["multi.test"] = ["::1", "127.0.0.1"]
    local.expect_request("/").respond_with_data("second address")

    response = net.guarded_request("GET", f"http://multi.test:{local.port}/", allowed_hosts=["multi.test"])

    assert response.body == b"second address"
    assert network.connections == [("::1", local.port), ("127.0.0.1", local.port)]


def test_a_name_without_addresses_fails_upstream(network, no_allow_list):
    network.dns["empty.test"] = []

    with pytest.raises(UpstreamError, match="has no address"):
        net.guarded_request("GET", "http://empty.test/", timeout=2)
    assert network.connections == []


# --- redirects ---------------------------------------------------------------------------------


def test_a_redirect_to_loopback_is_refused_and_never_followed(network, local, settings):
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["localhost"]
    target = f"http://127.0.0.1:{local.port}/secret"
    local.expect_request("/start").respond_with_data("", status=302, headers={"Location": target})
    local.expect_request("/secret").respond_with_data("internal data")

    with pytest.raises(net.DestinationRefused) as refused:
        net.guarded_request("GET", local_url(local, "/start"), timeout=5)

    message = refused.value.metadata["field_errors"]["url"][0]
    assert f"localhost redirected to {target}" in message
    assert "127.0.0.1 is a loopback address" in message
    assert [request.path for request, _ in local.log] == ["/start"]


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://10.0.0.1/", "10.0.0.1 is a private network address"),
        ("http://0x7f000001/", "unusual spelling"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
        ("http://inward.test/", "inward.test resolves to 10.9.8.7"),
        ("file:///etc/passwd", "Only http and https"),
        ("http://user:pw@example.com/", "user name or password"),
    ],
)
def test_every_redirect_hop_is_checked_again(location, words, network, local, settings):
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["localhost"]
    network.dns["inward.test"] = ["10.9.8.7"]
    local.expect_request("/hop").respond_with_data("", status=301, headers={"Location": location})

    with pytest.raises(net.DestinationRefused) as refused:
        net.guarded_request("GET", local_url(local, "/hop"), timeout=5)

    assert words in refused.value.metadata["field_errors"]["url"][0]
    assert network.outside_connections == []


def test_a_run_redirected_to_loopback_fails_with_a_clear_message(api, http_instance, network, local, settings):
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["localhost"]
    target = f"http://127.0.0.1:{local.port}/"
    local.expect_request("/go").respond_with_data("", status=307, headers={"Location": target})

    response = execute(api, http_instance, {"url": local_url(local, "/go")})

    assert response.status_code == 200
    body = response.json()
    assert body["success"] is False
    assert body["error_code"] == "INPUT_INVALID"
    assert f"localhost redirected to {target}, which cannot be followed" in body["error_message"]
    assert "127.0.0.1 is a loopback address" in body["error_message"]
    execution = Execution.objects.get()
    assert execution.status == Execution.Status.FAILED
    assert execution.error_code == "INPUT_INVALID"
    assert [request.path for request, _ in local.log] == ["/go"]


# --- the allow-list --------------------------------------------------------------------------


def test_an_allowed_host_still_gets_the_url_checks(settings, network):
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

    for url, words in [
        ("ftp://localhost/", "Only http and https"),
        ("http://admin:pw@localhost/", "user name or password"),
        ("http://0x7f000001/", "unusual spelling"),
    ]:
        with pytest.raises(net.DestinationRefused, match=words):
            net.guarded_request("GET", url, timeout=2)
    assert network.connections == []


def test_a_literal_address_on_the_allow_list_is_reached(settings, local):
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    local.expect_request("/ok").respond_with_data("fine")

    response = net.guarded_request("GET", f"http://127.0.0.1:{local.port}/ok")

    assert (response.status_code, response.body) == (200, b"fine")


def test_allow_list_entries_match_without_case_brackets_or_trailing_dot(settings, local):
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = [" LocalHost. "]
    local.expect_request("/ok").respond_with_data("fine")

    assert net.guarded_request("GET", f"http://localhost:{local.port}/ok").status_code == 200


def test_names_that_do_not_resolve_fail_upstream_in_words(network, no_allow_list):
    with pytest.raises(UpstreamError) as failed:
        net.guarded_request("GET", "https://nowhere.test/", timeout=2)

    envelope = failed.value.envelope({"tool": "HTTP Request"})
    assert envelope["error_code"] == "UPSTREAM_ERROR"
    assert envelope["error_message"] == (
        "nowhere.test answered with an error while HTTP Request was running: "
        "the host name could not be found (the DNS lookup failed)."
    )
    assert network.connections == []


# --- address classification ------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [PUBLIC_ADDRESS, "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_public_addresses_pass(address):
    assert net.address_refusal(ipaddress.ip_address(address)) is None


def test_ordinary_urls_parse_into_their_pieces():
    target = net.parse_url_strict("HTTPS://Api.Example.COM./v1/items?page=2#top")

    assert (target.scheme, target.host, target.port, target.path) == (
        "https",
        "api.example.com",
        443,
        "/v1/items?page=2",
    )
    assert target.url == "https://api.example.com/v1/items?page=2"
    assert net.parse_url_strict("http://[2606:4700::1111]:8080").host_header == "[2606:4700::1111]:8080"
    assert net.parse_url_strict("http://münchen.example/").host == "xn--mnchen-3ya.example"
