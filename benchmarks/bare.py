"""The stack's ceiling: a bare aiohttp handler under uvloop answering blobs and manifests
from memory (``python -m benchmarks.bare PORT FOLDER``).

Every file of FOLDER named ``<hex>`` (a blob) or ``manifest-<hex>`` (a manifest, its media
type on the first line of ``manifest-<hex>.type``) is read into memory at start; ``GET
/v2/<name>/blobs/sha256:<hex>`` and ``.../manifests/sha256:<hex>`` answer those bytes with
the registry's headers. No routing beyond one dynamic route, no middleware, no logging:
what the mirror's lean path is measured against.
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvloop
from aiohttp import web


def _app(folder: Path) -> web.Application:
    answers: dict[str, tuple[bytes, dict[str, str]]] = {}
    for path in folder.iterdir():
        if path.suffix == ".type":
            continue
        digest = "sha256:" + path.name.removeprefix("manifest-")
        kind = "manifests" if path.name.startswith("manifest-") else "blobs"
        media = (path.with_name(path.name + ".type").read_text().strip()
                 if kind == "manifests" else "application/octet-stream")
        answers[f"{kind}/{digest}"] = (path.read_bytes(), {
            "Content-Type": media, "Docker-Content-Digest": digest,
            "Docker-Distribution-API-Version": "registry/2.0"})

    async def handle(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        kind, _, digest = path.rpartition("/")
        found = answers.get(f"{kind.rsplit('/', 1)[-1]}/{digest}")
        if found is None:
            return web.Response(status=404 if path else 200)
        return web.Response(body=found[0], headers=found[1])

    app = web.Application()
    app.router.add_get("/v2/{path:.*}", handle)
    return app


def main() -> None:
    """Serve until killed."""
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    web.run_app(_app(folder), host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
