"""Is a TCP address free to listen on? Asked before starting anything that would bind it."""

from __future__ import annotations

import errno
import socket

from outbox.cli.embedded_pg import free_port


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (naming the flag that changes it), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on --host {host}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # The same option uvicorn sets: a port left in TIME_WAIT is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is already in use; "
                    f"choose another with --port (e.g. --port {free_port()})"
                )
            return f"cannot listen on --host {host} --port {port}: {exc.strerror}"
    return None
