"""Runs :class:`tests.support.throttle.ThrottledProxy` in a process of its own.

``python -m benchmarks.throttled HOST PORT RATE`` prints the port it listens
on, then forwards until terminated. In its own process the proxy's copying
neither competes with the benchmark's clients for the GIL nor slows them.
"""

from __future__ import annotations

import signal
import sys
import threading

from tests.support.throttle import ThrottledProxy


def main(argv: list[str]) -> None:
    """Start the proxy, print its port, wait for SIGTERM."""
    host, port, rate = argv[0], int(argv[1]), float(argv[2])
    proxy = ThrottledProxy(host, port, rate)
    proxy.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(proxy.port, flush=True)
    while not done.wait(0.5):
        pass
    proxy.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
