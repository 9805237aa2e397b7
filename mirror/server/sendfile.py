"""Kernel sendfile for cached blobs on any event loop, uvloop included.

uvloop has no ``loop.sendfile``, and the fallback (read a chunk in a thread,
write it to the transport) copies every byte twice through Python. Here the
mirror makes the ``sendfile(2)`` call itself, on a duplicate of the client
socket's file descriptor:

- each call runs in a worker thread (a page-cache miss must not block the
  loop) and returns as soon as the socket buffer is full, so a thread is never
  held by a slow client;
- the loop then waits for the socket to be writable (``add_writer`` on the
  duplicate, which the transport does not own);
- the duplicate keeps the socket open even if the transport closes its own
  descriptor meanwhile, so a reused descriptor number can never receive
  blob bytes.

The transport's own buffer must be empty before the first call (the response
headers must be on the wire first); :func:`socket_for_sendfile` says whether
that is the case, and whether the connection is plain TCP (TLS cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from collections.abc import Callable

#: Bytes one worker-thread call may move before it hands back to the loop.
HOP = 8 * 2**20
#: How long a worker thread waits for room in the socket buffer before handing back.
LINGER_MS = 20


def socket_for_sendfile(transport: asyncio.BaseTransport) -> int | None:
    """The client socket's descriptor when sendfile may be used on it, else ``None``.

    ``None`` for TLS connections (bytes must go through the TLS layer), for
    transports without a socket, and while the transport still buffers data of
    its own (it would be overtaken).
    """
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    # uvloop's transports are not asyncio.WriteTransport subclasses: ask, don't check.
    buffered = getattr(transport, "get_write_buffer_size", None)
    if sock is None or buffered is None or buffered() != 0:
        return None
    fileno = sock.fileno()
    return fileno if fileno >= 0 else None


async def sendfile(sock_fd: int, file_fd: int, offset: int, count: int,
                   on_sent: Callable[[int], None] | None = None) -> None:
    """Send ``count`` bytes of ``file_fd`` from ``offset`` to the socket.

    Args:
        on_sent: told the bytes handed to the kernel after every call, even one
            that finishes after the request was cancelled (a client that hangs
            up as soon as it has the last byte got the whole body).

    Raises:
        ConnectionResetError: the client went away, or the file ended early.
    """
    loop = asyncio.get_running_loop()
    dup = os.dup(sock_fd)
    try:
        end = offset + count
        while offset < end:
            sent = await _uncancellable_thread(dup, file_fd, offset, min(HOP, end - offset),
                                               on_sent)
            if sent < 0:
                raise ConnectionResetError("cached blob shrank while being sent")
            offset += sent
            if offset < end:
                await _writable(loop, dup)
    except (BrokenPipeError, ConnectionError) as exc:
        raise ConnectionResetError(f"client went away: {exc}") from exc
    finally:
        os.close(dup)


async def _uncancellable_thread(sock_fd: int, file_fd: int, offset: int, count: int,
                                on_sent: Callable[[int], None] | None) -> int:
    """:func:`_send_until_full` in a thread that is always awaited to its end.

    A request is cancelled when its client goes away; the thread still uses both
    descriptors, and they must not be closed (and their numbers reused) under it.
    It returns within ``LINGER_MS`` of the socket buffer filling up.
    """
    future = asyncio.ensure_future(asyncio.to_thread(_send_until_full, sock_fd, file_fd,
                                                     offset, count))
    try:
        sent = await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        if not future.cancelled():
            # Retrieved either way: the client went away, its broken pipe is no news.
            error = future.exception()
            if on_sent is not None and error is None and future.result() > 0:
                on_sent(future.result())
        raise
    if on_sent is not None and sent > 0:
        on_sent(sent)
    return sent


def _send_until_full(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """Blocking part, in a thread: send until done or the socket buffer is full.

    Returns:
        Bytes sent (maybe 0 when the buffer was already full), or -1 when the
        file ended before ``count`` bytes.
    """
    sent = 0
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            # A fast client drains the buffer within moments: wait here a little
            # rather than pay a round trip through the loop for every buffer.
            if poller.poll(LINGER_MS):
                continue
            return sent
        if n == 0:
            return -1
        sent += n
    return sent


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until the socket can take more bytes (or has failed: the next send says)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        with contextlib.suppress(Exception):
            loop.remove_writer(fd)
