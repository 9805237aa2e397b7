"""Load a page in a real headless Chromium (Debian's ``chromium``): its DOM and a screenshot.

Hermetic: a throwaway profile, no proxy, no background networking, so the
browser talks to the loopback URL it is given and nothing else. Async, so a
server in the test's own event loop keeps answering while the browser loads.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--no-first-run", "--disable-background-networking", "--disable-component-update",
          "--disable-sync", "--no-proxy-server", "--hide-scrollbars"]


class ChromiumError(RuntimeError):
    """Chromium failed or timed out; the message holds its stderr tail."""


def chromium_binary() -> str | None:
    """The browser, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


async def _run(args: list[str], timeout: float) -> str:
    binary = chromium_binary()
    if binary is None:
        raise ChromiumError("chromium is not on PATH (scripts/setup.sh --test installs it)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = await asyncio.create_subprocess_exec(
            binary, *_FLAGS, f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env={"HOME": profile, "PATH": "/usr/bin:/bin"})
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ChromiumError(f"chromium did not finish in {timeout}s") from None
    if proc.returncode != 0:
        tail = "\n".join(err.decode(errors="replace").splitlines()[-10:])
        raise ChromiumError(f"chromium exited {proc.returncode}:\n{tail}")
    return out.decode(errors="replace")


async def dump_dom(url: str, timeout: float = 60) -> str:
    """The DOM of ``url`` after it loaded, serialized (``--dump-dom``)."""
    return await _run(["--dump-dom", url], timeout)


async def screenshot(url: str, path: Path, size: tuple[int, int] = (1280, 1400),
                     timeout: float = 60) -> Path:
    """A PNG of ``url`` at ``size`` in ``path``."""
    await _run([f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url], timeout)
    if not await asyncio.to_thread(lambda: path.is_file() and path.stat().st_size > 0):
        raise ChromiumError(f"chromium wrote no screenshot at {path}")
    return path
