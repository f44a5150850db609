"""http-request through the API against real local servers: methods, query and bodies, JSON and
text answers, redirects, the size limit, the AUTH credential of each kind, TLS, and every way
of failing to get an answer (refused connection, time-outs, DNS, certificates) in words.

The test servers listen on 127.0.0.1 and are reached as ``localhost``, the one name the tests
put on TOOLEXEC_HTTP_ALLOWED_HOSTS.
"""

from __future__ import annotations

import datetime
import errno
import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import urllib3.util.connection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_httpserver import HTTPServer
from rest_framework.test import APIClient
from werkzeug import Request, Response

from credits.models import CreditAccount
from executions.models import Execution, Job
from tests.conftest import wait_for
from tools import net
from tools.builtin.http_request import HttpRequest, _auth_headers
from tools.errors import Cancelled, CredentialInvalid, UpstreamError

pytestmark = pytest.mark.django_db

SECRETS = {
    "bearer": {"token": "tok-3f9a7c1e5b"},
    "api_key": {"api_key": "key-8d2b6e0a4c"},
    "basic": {"username": "ada", "password": "pw-5c1e9b3d7f"},
}


# --- servers and helpers ------------------------------------------------------------------


def _server(**options: Any) -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", threaded=True, **options)
    server.start()
    yield server
    server.clear()
    server.stop()


@pytest.fixture(scope="module")
def _main_server() -> Iterator[HTTPServer]:
    yield from _server()


@pytest.fixture(scope="module")
def _other_server() -> Iterator[HTTPServer]:
    yield from _server()


@pytest.fixture
def server(_main_server: HTTPServer, settings: Any) -> HTTPServer:
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["localhost"]
    _main_server.clear()
    return _main_server


@pytest.fixture
def other_server(_other_server: HTTPServer) -> HTTPServer:
    _other_server.clear()
    return _other_server


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of the test, so a handler holding its answer back lets go at once."""
    event = threading.Event()
    yield event
    event.set()


def url(server: HTTPServer, path: str) -> str:
    return f"http://localhost:{server.port}{path}"


@pytest.fixture
def instance_id(api: APIClient, catalog: Any) -> str:
    response = api.post(
        "/api/v1/instances/",
        {"tool_definition_id": HttpRequest.slug, "workflow_id": "wf-http", "name": "Call the API"},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["status"] == "ACTIVE"  # the AUTH slot is optional
    return response.json()["id"]


def execute(api: APIClient, instance_id: str, inputs: dict[str, Any]) -> Any:
    return api.post(f"/api/v1/instances/{instance_id}/execute-sync", inputs, format="json")


def succeeded(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is True, body
    return body["data"]


def failed(response: Any, code: str) -> dict[str, Any]:
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is False, body
    assert body["error_code"] == code, body
    return body


def refused(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["error_code"] == "INPUT_INVALID"
    return body["metadata"]["field_errors"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def echo_headers(request: Request) -> Response:
    """Answers with the request's headers, names in lower case."""
    return Response(json.dumps({k.lower(): v for k, v in request.headers.items()}), content_type="application/json")


# --- requests and answers -----------------------------------------------------------------


def test_get_with_query_returns_status_headers_json_and_costs_two_hundredths(api, user, instance_id, server):
    server.expect_request(
        "/books", method="GET", query_string={"lang": "en", "q": "dune", "page": "2", "exact": "true"}
    ).respond_with_json({"results": [{"title": "Dune"}]}, headers={"X-Total": "1"})
    balance = CreditAccount.objects.get(owner=user).balance

    response = execute(
        api,
        instance_id,
        {"url": url(server, "/books?lang=en"), "query": {"q": "dune", "page": 2, "exact": True}},
    )

    body = response.json()
    data = succeeded(response)
    assert data["status_code"] == 200
    assert data["json"] == {"results": [{"title": "Dune"}]}
    assert "text" not in data
    assert data["headers"]["X-Total"] == "1"
    assert data["headers"]["Content-Type"] == "application/json"
    assert data["truncated"] is False
    assert data["url"] == url(server, "/books?lang=en&q=dune&page=2&exact=true")
    assert isinstance(data["elapsed_ms"], int) and data["elapsed_ms"] >= 0
    assert body["credits_consumed"] == 0.02
    assert CreditAccount.objects.get(owner=user).balance == balance - Decimal("0.02")
    execution = Execution.objects.get(pk=body["execution_id"])
    assert execution.status == Execution.Status.COMPLETED
    assert execution.output_data["json"] == {"results": [{"title": "Dune"}]}
    server.check_assertions()


def test_post_json_sends_it_as_application_json(api, instance_id, server):
    server.expect_request(
        "/orders", method="POST", json={"item": "book", "qty": 2}, headers={"Content-Type": "application/json"}
    ).respond_with_json({"id": 7}, status=201)

    data = succeeded(
        execute(api, instance_id, {"method": "POST", "url": url(server, "/orders"), "json": {"item": "book", "qty": 2}})
    )

    assert (data["status_code"], data["json"]) == (201, {"id": 7})
    server.check_assertions()


def test_text_body_and_own_headers_are_sent_as_given(api, instance_id, server):
    server.expect_request(
        "/notes",
        method="PUT",
        data="hello, world",
        headers={"Content-Type": "text/markdown", "X-Request-Id": "r-1", "User-Agent": "toolexec-http-request/1.0"},
    ).respond_with_data("", status=204)

    data = succeeded(
        execute(
            api,
            instance_id,
            {
                "method": "PUT",
                "url": url(server, "/notes"),
                "body": "hello, world",
                "headers": {"Content-Type": "text/markdown", "X-Request-Id": "r-1"},
            },
        )
    )

    assert data["status_code"] == 204
    assert data["text"] == ""
    server.check_assertions()


@pytest.mark.parametrize("method", ["DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_every_method_is_sent(api, instance_id, server, method):
    server.expect_request("/thing", method=method).respond_with_data("ok" if method != "HEAD" else "")

    data = succeeded(execute(api, instance_id, {"method": method, "url": url(server, "/thing")}))

    assert data["status_code"] == 200
    assert data["text"] == ("ok" if method != "HEAD" else "")
    server.check_assertions()


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_error_statuses_of_the_target_are_results_not_failures(api, instance_id, server, status):
    server.expect_request("/x").respond_with_json({"error": "nope"}, status=status, headers={"Retry-After": "30"})

    data = succeeded(execute(api, instance_id, {"url": url(server, "/x")}))

    assert data["status_code"] == status
    assert data["json"] == {"error": "nope"}
    assert data["headers"]["Retry-After"] == "30"


def test_text_answers_are_decoded_with_their_charset(api, instance_id, server):
    server.expect_request("/page").respond_with_data(
        "<p>café</p>".encode("latin-1"), content_type="text/html; charset=iso-8859-1"
    )

    data = succeeded(execute(api, instance_id, {"url": url(server, "/page")}))

    assert data["text"] == "<p>café</p>"
    assert "json" not in data


def test_undecodable_bytes_are_replaced_and_an_unknown_charset_falls_back_to_utf8(api, instance_id, server):
    server.expect_request("/bytes").respond_with_data(b"ok \xff\xfe end", content_type="text/plain")
    server.expect_request("/odd").respond_with_data(b"plain", content_type="text/plain; charset=x-unknown")

    assert succeeded(execute(api, instance_id, {"url": url(server, "/bytes")}))["text"] == "ok \ufffd\ufffd end"
    assert succeeded(execute(api, instance_id, {"url": url(server, "/odd")}))["text"] == "plain"


def test_json_types_with_a_suffix_are_parsed_and_broken_json_comes_back_as_text(api, instance_id, server):
    server.expect_request("/problem").respond_with_data(
        '{"title": "Not found"}', content_type="application/problem+json"
    )
    server.expect_request("/broken").respond_with_data('{"title": ', content_type="application/json")

    assert succeeded(execute(api, instance_id, {"url": url(server, "/problem")}))["json"] == {"title": "Not found"}
    broken = succeeded(execute(api, instance_id, {"url": url(server, "/broken")}))
    assert broken["text"] == '{"title": '
    assert "json" not in broken


def test_json_that_is_not_json_typed_stays_text(api, instance_id, server):
    server.expect_request("/plain").respond_with_data('{"a": 1}', content_type="text/plain")

    assert succeeded(execute(api, instance_id, {"url": url(server, "/plain")}))["text"] == '{"a": 1}'


def test_nul_characters_in_answers_are_replaced_so_the_run_can_be_stored(api, instance_id, server):
    server.expect_request("/nul-json").respond_with_data('{"a\\u0000": "b\\u0000c"}', content_type="application/json")
    server.expect_request("/nul-text").respond_with_data(b"x\x00y", content_type="text/plain")
    server.expect_request("/surrogate").respond_with_data('{"a": "\\ud800"}', content_type="application/json")

    assert succeeded(execute(api, instance_id, {"url": url(server, "/nul-json")}))["json"] == {"a\ufffd": "b\ufffdc"}
    assert succeeded(execute(api, instance_id, {"url": url(server, "/nul-text")}))["text"] == "x\ufffdy"
    assert succeeded(execute(api, instance_id, {"url": url(server, "/surrogate")}))["json"] == {"a": "?"}
    assert Execution.objects.filter(status=Execution.Status.COMPLETED).count() == 3


def test_json_nested_too_deeply_comes_back_as_text(api, instance_id, server):
    deep = "[" * 500 + "]" * 500
    server.expect_request("/deep").respond_with_data(deep, content_type="application/json")

    assert succeeded(execute(api, instance_id, {"url": url(server, "/deep")}))["text"] == deep


# --- redirects ----------------------------------------------------------------------------


def test_a_redirect_chain_is_followed_to_the_end(api, instance_id, server):
    server.expect_request("/a").respond_with_data("", status=301, headers={"Location": "/b"})
    server.expect_request("/b").respond_with_data("", status=302, headers={"Location": url(server, "/c?x=1")})
    server.expect_request("/c").respond_with_data("", status=307, headers={"Location": "d"})
    server.expect_request("/d").respond_with_data("", status=308, headers={"Location": "/final"})
    server.expect_request("/final").respond_with_json({"arrived": True})

    data = succeeded(execute(api, instance_id, {"url": url(server, "/a")}))

    assert data["status_code"] == 200
    assert data["json"] == {"arrived": True}
    assert data["url"] == url(server, "/final")
    assert [request.path for request, _ in server.log] == ["/a", "/b", "/c", "/d", "/final"]


def test_a_303_after_a_post_is_followed_with_a_get_without_the_body(api, instance_id, server):
    server.expect_request("/submit", method="POST").respond_with_data("", status=303, headers={"Location": "/done"})
    server.expect_request("/done", method="GET", data="").respond_with_data("thanks")

    data = succeeded(execute(api, instance_id, {"method": "POST", "url": url(server, "/submit"), "json": {"a": 1}}))

    assert data["text"] == "thanks"
    done, _ = server.log[1]
    assert "Content-Type" not in done.headers
    server.check_assertions()


def test_a_307_keeps_the_method_and_the_body(api, instance_id, server):
    server.expect_request("/old", method="PUT").respond_with_data("", status=307, headers={"Location": "/new"})
    server.expect_request("/new", method="PUT", json={"v": 2}).respond_with_data("stored")

    data = succeeded(execute(api, instance_id, {"method": "PUT", "url": url(server, "/old"), "json": {"v": 2}}))

    assert data["text"] == "stored"
    server.check_assertions()


def test_more_than_five_redirects_fail_upstream_in_words(api, instance_id, server):
    for hop in range(7):
        server.expect_request(f"/r{hop}").respond_with_data("", status=302, headers={"Location": f"/r{hop + 1}"})

    body = failed(execute(api, instance_id, {"url": url(server, "/r0")}), "UPSTREAM_ERROR")

    assert body["error_message"] == (
        "localhost answered with an error while HTTP Request was running: "
        "it redirected more than 5 times, so the redirects were not followed further."
    )
    assert len(server.log) == 6
    assert Execution.objects.get().status == Execution.Status.FAILED


def test_a_redirect_without_location_is_the_answer(api, instance_id, server):
    server.expect_request("/moved").respond_with_data("gone somewhere", status=302)

    data = succeeded(execute(api, instance_id, {"url": url(server, "/moved")}))

    assert (data["status_code"], data["text"]) == (302, "gone somewhere")


# --- the size limit -----------------------------------------------------------------------


def test_an_answer_over_the_limit_is_cut_and_flagged(api, instance_id, server, settings):
    settings.TOOLEXEC_HTTP_MAX_RESPONSE_BYTES = 1000
    server.expect_request("/big").respond_with_data("x" * 5000)
    server.expect_request("/fits").respond_with_data("y" * 1000)

    big = succeeded(execute(api, instance_id, {"url": url(server, "/big")}))
    fits = succeeded(execute(api, instance_id, {"url": url(server, "/fits")}))

    assert (big["text"], big["truncated"]) == ("x" * 1000, True)
    assert (fits["text"], fits["truncated"]) == ("y" * 1000, False)


def test_a_cut_json_answer_comes_back_as_text(api, instance_id, server, settings):
    settings.TOOLEXEC_HTTP_MAX_RESPONSE_BYTES = 10
    server.expect_request("/list").respond_with_json(list(range(100)))

    data = succeeded(execute(api, instance_id, {"url": url(server, "/list")}))

    assert data["truncated"] is True
    assert len(data["text"]) == 10
    assert "json" not in data


def test_the_limit_counts_decompressed_bytes(api, instance_id, server, settings):
    settings.TOOLEXEC_HTTP_MAX_RESPONSE_BYTES = 1000
    bomb = gzip.compress(b"0" * 2_000_000)  # 2 KB on the wire, 2 MB unpacked
    server.expect_request("/bomb").respond_with_data(bomb, headers={"Content-Encoding": "gzip"})

    data = succeeded(execute(api, instance_id, {"url": url(server, "/bomb")}))

    assert (data["text"], data["truncated"]) == ("0" * 1000, True)


# --- the AUTH credential ------------------------------------------------------------------


def map_credential(api: APIClient, instance_id: str, kind: str, **extra: Any) -> str:
    created = api.post(
        "/api/v1/credentials/",
        {"provider": "http", "kind": kind, "label": f"Test {kind}", "secret": SECRETS[kind], **extra},
        format="json",
    )
    assert created.status_code == 201, created.content
    credential_id = created.json()["id"]
    mapped = api.post(
        f"/api/v1/instances/{instance_id}/configure-credentials",
        {"credential_mappings": {"AUTH": credential_id}},
        format="json",
    )
    assert mapped.status_code == 200, mapped.content
    return credential_id


@pytest.mark.parametrize(
    ("kind", "header", "value"),
    [
        ("bearer", "Authorization", "Bearer tok-3f9a7c1e5b"),
        ("api_key", "X-Service-Key", "key-8d2b6e0a4c"),  # the credential's metadata.header_name
        ("basic", "Authorization", "Basic YWRhOnB3LTVjMWU5YjNkN2Y="),  # ada:pw-5c1e9b3d7f
    ],
)
def test_each_credential_kind_adds_its_header_and_never_comes_back(api, instance_id, server, kind, header, value):
    extra = {"metadata": {"header_name": "X-Service-Key"}} if kind == "api_key" else {}
    map_credential(api, instance_id, kind, **extra)
    server.expect_request("/me", headers={header: value}).respond_with_handler(echo_headers)

    response = execute(
        api, instance_id, {"url": url(server, "/me"), "headers": {"Authorization": "Bearer from-the-inputs"}}
    )

    data = succeeded(response)
    server.check_assertions()  # the server saw the credential's header ...
    echoed = data["json"][header.lower()]
    assert echoed.endswith("[REDACTED]")  # ... and the output does not repeat it
    assert value.split()[-1] not in response.content.decode()
    for secret in SECRETS[kind].values():
        assert secret not in response.content.decode()
    seen, _ = server.log[0]
    if kind == "api_key":
        assert seen.headers["Authorization"] == "Bearer from-the-inputs"  # untouched beside an API key
    else:
        assert seen.headers.getlist("Authorization") == [value]  # the credential wins over the inputs
    recorded = Execution.objects.get().input_data
    assert recorded["headers"]["Authorization"] == "[REDACTED]"


def test_without_a_mapped_credential_no_authorization_is_sent(api, instance_id, server):
    server.expect_request("/open").respond_with_handler(echo_headers)

    data = succeeded(execute(api, instance_id, {"url": url(server, "/open")}))

    assert "authorization" not in data["json"]
    assert "x-api-key" not in data["json"]


def test_the_credential_stays_on_its_origin_across_redirects(api, instance_id, server, other_server):
    map_credential(api, instance_id, "bearer")
    server.expect_request("/same").respond_with_data("", status=302, headers={"Location": "/here"})
    server.expect_request("/here").respond_with_data("", status=302, headers={"Location": url(other_server, "/away")})
    other_server.expect_request("/away").respond_with_handler(echo_headers)

    data = succeeded(
        execute(api, instance_id, {"url": url(server, "/same"), "headers": {"Cookie": "session=abc123", "X-Keep": "1"}})
    )

    here, _ = server.log[1]
    assert here.headers["Authorization"] == "Bearer tok-3f9a7c1e5b"  # same origin: kept
    assert "authorization" not in data["json"]  # another origin: dropped
    assert "cookie" not in data["json"]
    assert data["json"]["x-keep"] == "1"


def test_a_credential_a_header_cannot_carry_fails_the_run_as_invalid(api, instance_id, server):
    created = api.post(
        "/api/v1/credentials/",
        {"provider": "http", "kind": "basic", "label": "Colon", "secret": {"username": "a:b", "password": "pw-1234"}},
        format="json",
    )
    api.post(
        f"/api/v1/instances/{instance_id}/configure-credentials",
        {"credential_mappings": {"AUTH": created.json()["id"]}},
        format="json",
    )

    body = failed(execute(api, instance_id, {"url": url(server, "/x")}), "CREDENTIAL_INVALID")

    assert "must not contain a colon" in body["error_message"]
    assert server.log == []


# --- failing to get an answer -------------------------------------------------------------


def test_a_refused_connection_fails_upstream_in_words(api, instance_id, server):
    port = closed_port()

    body = failed(execute(api, instance_id, {"url": f"http://localhost:{port}/"}), "UPSTREAM_ERROR")

    assert body["error_message"] == (
        "localhost answered with an error while HTTP Request was running: "
        f"the connection to port {port} was refused (nothing is listening there)."
    )
    assert body["metadata"]["can_retry"] is True
    execution = Execution.objects.get()
    assert (execution.status, execution.error_code) == (Execution.Status.FAILED, "UPSTREAM_ERROR")


def test_a_target_that_does_not_answer_in_time_fails_upstream(api, instance_id, server, release):
    server.expect_request("/stuck").respond_with_handler(lambda request: release.wait(10) and Response("late"))

    started = time.monotonic()
    body = failed(execute(api, instance_id, {"url": url(server, "/stuck"), "timeout_seconds": 0.5}), "UPSTREAM_ERROR")

    assert time.monotonic() - started < 5
    assert body["error_message"].endswith("it did not answer within 0.5 seconds.")


def test_a_body_dripping_in_past_the_timeout_is_cut_off_at_the_timeout(api, instance_id, server, release):
    def drip(request: Request) -> Response:
        def chunks() -> Iterator[bytes]:
            while not release.wait(0.1):
                yield b"."

        return Response(chunks(), content_type="text/plain", direct_passthrough=True)

    server.expect_request("/drip").respond_with_handler(drip)

    started = time.monotonic()
    body = failed(execute(api, instance_id, {"url": url(server, "/drip"), "timeout_seconds": 1}), "UPSTREAM_ERROR")

    assert time.monotonic() - started < 5
    assert body["error_message"].endswith("it did not answer completely within 1 second.")


def test_an_unknown_host_name_fails_upstream_in_words(api, instance_id, monkeypatch):
    real = socket.getaddrinfo

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".test"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)

    body = failed(execute(api, instance_id, {"url": "https://nowhere.test/"}), "UPSTREAM_ERROR")

    assert body["error_message"] == (
        "nowhere.test answered with an error while HTTP Request was running: "
        "the host name could not be found (the DNS lookup failed)."
    )


def test_a_connection_that_breaks_off_fails_upstream(api, instance_id, settings):
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["localhost"]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def hang_up() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        connection.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        body = failed(
            execute(api, instance_id, {"url": f"http://localhost:{listener.getsockname()[1]}/"}), "UPSTREAM_ERROR"
        )
    finally:
        thread.join(5)
        listener.close()

    assert body["error_message"].endswith("the connection broke off before a complete answer arrived.")


def test_a_body_that_does_not_decompress_fails_upstream(api, instance_id, server):
    server.expect_request("/zip").respond_with_data(b"not gzip at all", headers={"Content-Encoding": "gzip"})

    body = failed(execute(api, instance_id, {"url": url(server, "/zip")}), "UPSTREAM_ERROR")

    assert body["error_message"].endswith("it sent a compressed body that could not be decompressed.")


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (TimeoutError("timed out"), "it did not accept a connection within 2 seconds."),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "failed: network is unreachable."),
        (OSError("no reason given"), "the connection to port 9 failed."),
    ],
)
def test_other_connection_failures_fail_upstream_in_words(api, instance_id, server, monkeypatch, error, words):
    def connect(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(urllib3.util.connection, "create_connection", connect)

    body = failed(execute(api, instance_id, {"url": "http://localhost:9/", "timeout_seconds": 2}), "UPSTREAM_ERROR")

    assert body["error_message"].endswith(words)


def test_a_stop_between_reads_ends_the_request(server):
    server.expect_request("/long").respond_with_data("z" * 300_000)
    calls = []

    def check_stop() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        net.guarded_request("GET", url(server, "/long"), check_stop=check_stop)


@pytest.mark.parametrize(
    ("secret", "words"),
    [
        ({}, "not a bearer token, an API key or a user name and password"),
        ({"token": "tok\r\nX-Injected: 1"}, "cannot be sent in an HTTP header"),
    ],
)
def test_secrets_that_cannot_become_a_header_are_refused_as_invalid(secret, words):
    with pytest.raises(CredentialInvalid, match=words) as refusal:
        _auth_headers(secret, {})

    assert refusal.value.params["slot"] == "AUTH"


def test_an_api_key_is_sent_in_the_header_its_credential_names():
    assert _auth_headers({"api_key": "k-1"}, {"header_name": "X-Service-Key"}) == {"X-Service-Key": "k-1"}
    assert _auth_headers({"api_key": "k-1"}, {}) == {"X-API-Key": "k-1"}


def test_a_header_name_that_cannot_be_a_header_is_refused_as_invalid():
    with pytest.raises(CredentialInvalid, match="cannot be sent in an HTTP header"):
        _auth_headers({"api_key": "k"}, {"header_name": "Bad Name"})


# --- inputs refused before anything is recorded ---------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "field", "words"),
    [
        ({"url": "https://example.com/", "json": {"a": 1}, "body": "a=1"}, "json", "either json or body"),
        ({"url": "https://example.com/", "json": None, "body": "a=1"}, "body", "either json or body"),
        ({"url": "https://example.com/", "timeout_seconds": 31}, "timeout_seconds", "at most 30"),
        ({"url": "https://example.com/", "timeout_seconds": 0}, "timeout_seconds", "greater than 0"),
        ({"url": "https://example.com/", "method": "TRACE"}, "method", "Must be one of"),
        ({"url": "https://example.com/", "headers": {"Host": "internal"}}, "headers.Host", "leave it out"),
        ({"url": "https://example.com/", "headers": {"Content-Length": "5"}}, "headers.Content-Length", "leave it"),
        ({"url": "https://example.com/", "headers": {"X-A": "a\r\nX-B: b"}}, "headers.X-A", "line breaks"),
        ({"url": "https://example.com/", "headers": {"Bad Name": "x"}}, "headers.Bad Name", "header name"),
        ({"url": "https://example.com/", "headers": {"X-N": 5}}, "headers.X-N", "type string"),
        ({"url": "https://example.com/", "query": {"a": {"b": 1}}}, "query.a", "type"),
        ({"url": "https://example.com/" + "a" * 2048}, "url", "at most 2048"),
        ({"url": "https://example.com/", "query": {"q": "a" * 9000}}, "url", "at most 8192"),
        ({"url": "mailto:someone@example.com"}, "url", "Only http and https"),
        ({}, "url", "required"),
        ({"url": "https://example.com/", "verify": False}, "verify", ""),
    ],
)
def test_invalid_inputs_answer_400_naming_the_field_and_record_nothing(api, instance_id, inputs, field, words):
    errors = refused(execute(api, instance_id, inputs))

    assert field in errors, errors
    assert words in " ".join(errors[field])
    assert not Execution.objects.exists()


def test_the_catalog_describes_http_request(api, catalog):
    response = api.get(f"/api/v1/tools/{HttpRequest.slug}/")

    assert response.status_code == 200, response.content
    tool = response.json()
    assert tool["name"] == "HTTP Request"
    assert set(tool["modes"]) == {"sync", "async"}
    assert HttpRequest.idempotent is False
    assert HttpRequest.retry_on == frozenset()
    assert HttpRequest.base_credits == Decimal("0.02")
    [slot] = HttpRequest.credential_slots
    assert (slot.name, slot.provider, slot.kinds, slot.required) == (
        "AUTH",
        "http",
        ("bearer", "api_key", "basic"),
        False,
    )


# --- TLS (at the guard: the tool always verifies against certifi's roots) --------------------


def _certificate(name: str, key: Any, issuer: x509.Name, issuer_key: Any, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A private CA (its PEM file) and server contexts with certificates for localhost and for
    another name."""
    folder: Path = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "toolexec test CA")])
    ca_cert = _certificate("toolexec test CA", ca_key, ca_name, ca_key, ca=True)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    contexts = {}
    for name in ("localhost", "elsewhere.example"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ca_name, ca_key, ca=False)
        (folder / f"{name}.pem").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(folder / f"{name}.pem")
        contexts[name] = context
    return {"ca": str(folder / "ca.pem"), **contexts}


@pytest.fixture
def tls_server(tls: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[HTTPServer]:
    yield from _server(ssl_context=tls[getattr(request, "param", "localhost")])


def test_https_connects_to_the_checked_address_and_verifies_the_name(tls, tls_server):
    tls_server.expect_request("/secure").respond_with_data("over tls")

    response = net.guarded_request(
        "GET", f"https://localhost:{tls_server.port}/secure", allowed_hosts=["localhost"], ca_certs=tls["ca"]
    )

    assert (response.status_code, response.body) == (200, b"over tls")


def test_https_with_an_untrusted_certificate_fails_upstream_in_words(api, instance_id, server, tls_server):
    tls_server.expect_request("/secure").respond_with_data("over tls")

    body = failed(execute(api, instance_id, {"url": f"https://localhost:{tls_server.port}/secure"}), "UPSTREAM_ERROR")

    assert "a secure connection could not be made: its certificate was not accepted" in body["error_message"]
    assert tls_server.log == []


@pytest.mark.parametrize("tls_server", ["elsewhere.example"], indirect=True)
def test_https_with_a_certificate_for_another_name_fails_upstream(tls, tls_server):
    with pytest.raises(UpstreamError) as failure:
        net.guarded_request(
            "GET", f"https://localhost:{tls_server.port}/", allowed_hosts=["localhost"], ca_certs=tls["ca"]
        )

    assert failure.value.detail == "a secure connection could not be made: its certificate is not valid for localhost."


# --- async --------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_async_run_on_a_worker_returns_the_answer(api, catalog, rq_worker, _main_server, settings):
    settings.TOOLEXEC_HTTP_ALLOWED_HOSTS = ["localhost"]  # here for validation, in the worker to run
    _main_server.clear()
    _main_server.expect_request("/report").respond_with_json({"rows": 3})
    created = api.post(
        "/api/v1/instances/",
        {"tool_definition_id": HttpRequest.slug, "workflow_id": "wf-http", "name": "Async call"},
        format="json",
    ).json()
    rq_worker(TOOLEXEC_HTTP_ALLOWED_HOSTS="localhost")

    accepted = api.post(
        f"/api/v1/instances/{created['id']}/execute-async",
        {"url": url(_main_server, "/report")},
        format="json",
    )

    assert accepted.status_code == 202, accepted.content
    job_id = accepted.json()["job_id"]
    wait_for(lambda: Job.objects.get(pk=job_id).status in Job.TERMINAL, timeout=30, message="the job to finish")
    result = api.get(f"/api/v1/instances/{created['id']}/jobs/{job_id}/result").json()
    assert result["status"] == "COMPLETED", result
    assert result["result"]["status_code"] == 200
    assert result["result"]["json"] == {"rows": 3}
    assert result["credits_consumed"] == 0.02
