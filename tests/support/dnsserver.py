"""A tiny authoritative DNS server on a loopback UDP port: A records the test can change.

Stands in for the cluster DNS of a Kubernetes headless Service (every ready pod's
address under one name), so that tests can add and remove nodes.
"""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rdatatype
import dns.rrset


class DnsServer:
    """Answers ``name`` with ``addresses`` (A records, TTL 1); NXDOMAIN for other names."""

    def __init__(self, name: str) -> None:
        self.name = name.rstrip(".") + "."
        self.addresses: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._running = True

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._sock.close()

    def _serve(self) -> None:
        while self._running:
            try:
                data, peer = self._sock.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            response = dns.message.make_response(query)
            question = query.question[0]
            if question.name.to_text().lower() != self.name.lower():
                response.set_rcode(3)  # NXDOMAIN
            elif question.rdtype == dns.rdatatype.A and self.addresses:
                response.answer.append(dns.rrset.from_text_list(
                    question.name, 1, "IN", "A", list(self.addresses)))
            try:
                self._sock.sendto(response.to_wire(), peer)
            except OSError:  # closed by stop() meanwhile
                return
