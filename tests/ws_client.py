"""A plain RFC 6455 client, just enough for the tests and the WebSocket benchmark: the handshake
(with subprotocols), masked frames out, text and close frames in, pings answered. Blocking
(``PlainWebSocket``: a socket or a few in a test) and asyncio (``AsyncWebSocket``: a thousand in
one process, bench/websocket_fanout.py), on one framing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def handshake_request(host: str, port: int, path: str, subprotocols: list[str]) -> tuple[bytes, str]:
    """The upgrade request, and the key whose answer the server must send back."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def handshake_answer(head: bytes, key: str) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased) of the server's answer, ``head`` being
    everything before its blank line; AssertionError unless it is a 101 that answers ``key``."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    assert status == 101 and headers.get("sec-websocket-accept") == expected, (status, headers)
    return status, headers


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """One final frame, masked as a client's must be."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    mask = os.urandom(4)
    key = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
    return header + mask + masked


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


class FrameReader:
    """Cuts what the server sends into messages: ``feed(data)`` gives the (opcode, payload) of
    each one it completes (a text message's fragments joined; the server's frames are not masked)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.fragments: list[bytes] = []
        self.fragmented_opcode = TEXT

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        messages = []
        while len(self.buffer) >= 2:
            first, second = self.buffer[0], self.buffer[1]
            size, at = second & 0x7F, 2
            if size == 126:
                if len(self.buffer) < 4:
                    break
                (size,), at = struct.unpack_from("!H", self.buffer, 2), 4
            elif size == 127:
                if len(self.buffer) < 10:
                    break
                (size,), at = struct.unpack_from("!Q", self.buffer, 2), 10
            if len(self.buffer) < at + size:
                break
            payload = bytes(self.buffer[at : at + size])
            del self.buffer[: at + size]
            opcode, final = first & 0x0F, bool(first & 0x80)
            if opcode >= CLOSE:  # control frames come whole, even between fragments
                messages.append((opcode, payload))
                continue
            if opcode != CONTINUATION:
                self.fragmented_opcode = opcode
            self.fragments.append(payload)
            if final:
                messages.append((self.fragmented_opcode, b"".join(self.fragments)))
                self.fragments = []
        return messages


class PlainWebSocket:
    """A blocking client: ``receive()`` gives ("text", the message) or ("close", its code)."""

    def __init__(self, host: str, port: int, path: str, *, subprotocols: list[str], timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        request, key = handshake_request(host, port, path, subprotocols)
        self.sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server dropped the connection during the handshake")
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        self.status, self.headers = handshake_answer(head, key)
        self.reader = FrameReader()
        self.pending = self.reader.feed(rest)

    def receive(self) -> tuple[str, Any]:
        while True:
            while not self.pending:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server dropped the connection")
                self.pending = self.reader.feed(chunk)
            opcode, payload = self.pending.pop(0)
            if opcode == PING:
                self.sock.sendall(frame(PONG, payload))
            elif opcode == CLOSE:
                self.sock.sendall(frame(CLOSE, payload[:2]))
                return "close", close_code(payload)
            elif opcode == TEXT:
                return "text", payload.decode()

    def close(self) -> None:
        """The closing handshake when the socket is still open, then the TCP connection."""
        try:
            self.sock.sendall(frame(CLOSE, struct.pack("!H", 1000)))
            while self.receive()[0] != "close":
                pass
        except OSError:
            pass  # the server closed first
        self.sock.close()


class AsyncWebSocket(asyncio.Protocol):
    """An asyncio client that hands each text message to ``on_text(payload)`` as it arrives (no
    task per socket: a thousand of them cost one process little). Open with ``connect``."""

    def __init__(self, host: str, port: int, path: str, subprotocols: list[str], on_text: Callable[[bytes], None]):
        self.request, self.key = handshake_request(host, port, path, subprotocols)
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader: FrameReader | None = None
        self.headers: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int] = loop.create_future()  # the close code

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str,
        *,
        subprotocols: list[str],
        on_text: Callable[[bytes], None],
        timeout: float = 30,
    ) -> AsyncWebSocket:
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: cls(host, port, path, subprotocols, on_text), host, port), timeout
        )
        await asyncio.wait_for(protocol.opened, timeout)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            try:
                _, self.headers = handshake_answer(head, self.key)
            except AssertionError as refused:
                self.opened.set_exception(ConnectionError(f"the handshake was refused: {refused}"))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.reader = FrameReader()
            self.opened.set_result(None)
        for opcode, payload in self.reader.feed(data):
            if opcode == TEXT:
                self.on_text(payload)
            elif opcode == PING:
                self.transport.write(frame(PONG, payload))  # type: ignore[union-attr]
            elif opcode == CLOSE:
                if not self.closed.done():
                    self.transport.write(frame(CLOSE, payload[:2]))  # type: ignore[union-attr]
                    self.closed.set_result(close_code(payload))
                self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("the server dropped the connection during the handshake"))
        if not self.closed.done():
            self.closed.set_result(1006)  # no close frame

    async def close(self, timeout: float = 10) -> int:
        """The closing handshake, then the TCP connection; the server's close code."""
        if not self.closed.done() and self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(CLOSE, struct.pack("!H", 1000)))
        try:
            return await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        finally:
            if self.transport is not None:
                self.transport.close()
