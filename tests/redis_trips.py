"""Counting Redis round trips at the socket: every write redis-py makes is one (a pipeline is
written in one go). The real client talks to the real Redis meanwhile; this only watches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from redis.connection import AbstractConnection


def resp_commands(packed: Any) -> list[list[bytes]]:
    """The commands in what redis-py writes in one go (RESP arrays of bulk strings)."""
    data = bytes(packed) if isinstance(packed, bytes | bytearray | memoryview) else b"".join(map(bytes, packed))
    commands, at = [], 0
    while at < len(data):
        end = data.index(b"\r\n", at)
        count, at = int(data[at + 1 : end]), end + 2
        command = []
        for _ in range(count):
            end = data.index(b"\r\n", at)
            length = int(data[at + 1 : end])
            command.append(data[end + 2 : end + 2 + length])
            at = end + 2 + length + 2
        commands.append(command)
    return commands


@contextlib.contextmanager
def redis_round_trips() -> Iterator[list[list[list[bytes]]]]:
    """Every write to a Redis socket meanwhile: a list of round trips, each a list of commands."""
    trips: list[list[list[bytes]]] = []
    real = AbstractConnection.send_packed_command

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        trips.append(resp_commands(command))
        return real(self, command, check_health)

    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    try:
        yield trips
    finally:
        AbstractConnection.send_packed_command = real  # type: ignore[method-assign]
