"""Kernel sendfile on a client socket: exact bytes, slow readers, early hang-ups."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import mirror.server.sendfile as module
from mirror.server.sendfile import sendfile, socket_for_sendfile

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(12 * 2**20 + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


def _recording(send: Callable[[int], Awaitable[None]],
               outcome: asyncio.Future[BaseException | None]) -> Handler:
    """A handler that runs ``send(sock_fd)`` and records how it ended."""

    async def handler(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock_fd = socket_for_sendfile(writer.transport)
        assert sock_fd is not None
        try:
            await send(sock_fd)
            outcome.set_result(None)
        except ConnectionResetError as exc:
            outcome.set_result(exc)
        finally:
            writer.close()

    return handler


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_sends_exactly_the_slice_asked_for(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    offset, count = 1000, len(data) - 5000

    async def handler(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock_fd = socket_for_sendfile(writer.transport)
        assert sock_fd is not None
        with path.open("rb") as file:
            await sendfile(sock_fd, file.fileno(), offset, count)
        writer.close()

    server, port = await _serve(handler)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = await reader.read()
        writer.close()
    assert got == data[offset:offset + count]


async def test_a_slow_reader_gets_every_byte(blob: tuple[Path, bytes]) -> None:
    path, data = blob

    async def handler(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock_fd = socket_for_sendfile(writer.transport)
        assert sock_fd is not None
        with path.open("rb") as file:
            await sendfile(sock_fd, file.fileno(), 0, len(data))
        writer.close()

    server, port = await _serve(handler)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**16)
        parts = []
        while chunk := await reader.read(2**16):
            parts.append(chunk)
            if len(parts) % 16 == 0:
                await asyncio.sleep(0.01)  # the socket buffer fills; the sender must wait
        writer.close()
    assert b"".join(parts) == data


async def test_a_client_that_hangs_up_ends_the_send_and_leaks_nothing(
        blob: tuple[Path, bytes]) -> None:
    path, data = blob
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def send(sock_fd: int) -> None:
        with path.open("rb") as file:
            for _ in range(50):  # far more than the socket buffers hold
                await sendfile(sock_fd, file.fileno(), 0, len(data))

    before = _open_fds()
    server, port = await _serve(_recording(send, outcome))
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readexactly(2**20)
        writer.transport.abort()
        error = await asyncio.wait_for(outcome, 10)
    assert isinstance(error, ConnectionResetError)
    await asyncio.sleep(0.05)
    assert _open_fds() <= before


async def test_a_file_shorter_than_announced_is_an_error(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def send(sock_fd: int) -> None:
        with path.open("rb") as file:
            await sendfile(sock_fd, file.fileno(), len(data) - 10, 100)

    server, port = await _serve(_recording(send, outcome))
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = await reader.read()
        writer.close()
        error = await asyncio.wait_for(outcome, 10)
    assert isinstance(error, ConnectionResetError)
    assert got == data[-10:]


@pytest.mark.parametrize("accounted", [False, True])
async def test_a_cancelled_send_whose_thread_broke_leaves_no_unretrieved_error(
        monkeypatch: pytest.MonkeyPatch, accounted: bool) -> None:
    # The client went away: the request is cancelled while the thread is in sendfile,
    # which then fails on the broken pipe. That error is no news: asyncio must not
    # report it as "Task exception was never retrieved" (with or without on_sent).
    started, release = threading.Event(), threading.Event()

    def broken(_sock: int, _file: int, _offset: int, _count: int) -> int:
        started.set()
        release.wait(10)
        raise BrokenPipeError("the client went away")

    monkeypatch.setattr(module, "_send_until_full", broken)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    sent: list[int] = []
    read_fd, write_fd = os.pipe()
    try:
        task = asyncio.create_task(module.sendfile(write_fd, read_fd, 0, 100,
                                                   sent.append if accounted else None))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.01)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
        os.close(read_fd)
        os.close(write_fd)
    assert reported == []
    assert sent == []
