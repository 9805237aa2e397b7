"""Waits until every pod of the cleanup DaemonSet is ready: each removed the chart's
hosts.toml lines on its node. Run by the post-delete hook's Job with the pod's service
account (the Job's deadline bounds the wait); API_URL and TOKEN_FILE are for tests."""

import json
import os
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def _url() -> str:
    api = os.environ.get("API_URL") or (f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:"
                                        f"{os.environ['KUBERNETES_SERVICE_PORT']}")
    return (f"{api}/apis/apps/v1/namespaces/{os.environ['NAMESPACE']}/daemonsets/"
            f"{os.environ['DAEMONSET']}")


def _done(daemonset: dict[str, Any]) -> bool:
    status = daemonset.get("status", {})
    want = status.get("desiredNumberScheduled", -1)
    ready = status.get("numberReady", 0)
    print(f"cleanup: {ready} of {want} node(s) done", flush=True)
    current = status.get("observedGeneration", 0) >= daemonset["metadata"].get("generation", 1)
    updated = status.get("updatedNumberScheduled", want) >= want
    return current and updated and 0 <= want <= ready


def main() -> None:
    """Ask the API every 2 s until the DaemonSet is ready on every node."""
    url = _url()
    token = Path(os.environ.get("TOKEN_FILE", f"{ACCOUNT}/token")).read_text().strip()
    context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt") \
        if url.startswith("https:") else None
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as answer:
                if _done(json.load(answer)):
                    sys.exit(0)
        except (OSError, ValueError) as exc:  # the API may be briefly unreachable
            print(f"cleanup: waiting ({exc})", flush=True)
        time.sleep(2)


main()
