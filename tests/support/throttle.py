"""A TCP proxy that slows the upstream's answers to a fixed rate.

It lets a test see the order of events in a download (first bytes reach
every client long before the last byte arrives) without timing assertions.
It runs its own event loop in a thread, so blocking test code can use it.
"""

from __future__ import annotations

import asyncio
import threading
import time

from tests.support.net import free_port


class ThrottledProxy:
    """Forwards 127.0.0.1:port to ``target``; answers limited to ``rate`` bytes/s."""

    def __init__(self, target_host: str, target_port: int, rate: float) -> None:
        self.target = (target_host, target_port)
        self.rate = rate
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(timeout=5)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers.add(up_w)
        await asyncio.gather(self._pipe(client_r, up_w, None), self._pipe(up_r, client_w,
                                                                          self.rate),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    rate: float | None) -> None:
        started, sent = time.monotonic(), 0
        try:
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
                sent += len(data)
                if rate:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        finally:
            writer.close()
