"""What the server checks about a connection before and while it serves it: who may connect
(``Host``/``Origin``), how long a request may take to arrive, whether the peer is still there, and
the one-line answers for those it refuses. The HTTP routes are in ``rargen.serve.server``."""

from __future__ import annotations

import errno
import io
import json
import math
import select
import socket
import struct
import time
import weakref

# Connections whose response has begun (its status line is out), and those sent a `100 Continue`
# probe. Weak: an entry goes with its socket.
_ANSWERING: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_PROBED: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8  # linux/tcp_states.h


def _tcp_state(connection: socket.socket) -> int | None:
    """The kernel's TCP state of ``connection`` (Linux), or None where it cannot be read."""
    try:
        return struct.unpack("B", connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
    except (AttributeError, OSError, struct.error):
        return None


def client_gone(connection: socket.socket) -> bool:
    """True when the peer is gone, without consuming anything it sent.

    End of stream alone is not enough: a client that half-closes its side after a complete request
    (``nc -N``, ``shutdown(SHUT_WR)``) still reads the answer, and its FIN looks like a close. So
    at end of stream, before any answer went out, the connection gets one ``100 Continue`` (an
    interim response every HTTP/1.1 client must accept): a peer that really closed answers it with
    a reset, which the next check sees; a half-closed one stays. Once the answer has begun, its own
    writes fail when the peer is gone. Where the TCP state cannot be read, end of stream is gone.
    """
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        if not readable or connection.recv(1, socket.MSG_PEEK) != b"":
            return False
    except (OSError, ValueError):
        return True
    state = _tcp_state(connection)
    if state is None or state == _TCP_CLOSE:
        return True
    if state != _TCP_CLOSE_WAIT or connection in _ANSWERING:
        return state != _TCP_CLOSE_WAIT
    if connection not in _PROBED:
        _PROBED.add(connection)
        try:
            connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError:
            return True
    return False


class RequestDeadline(Exception):
    """A client did not send its whole request within ``Handler.request_deadline`` seconds."""


class DeadlineReader(io.RawIOBase):
    """A socket reader that gives up when the request's overall deadline passes.

    The per-read timeout alone lets a client that sends one byte every 59 s hold a thread for ever.
    """

    def __init__(self, connection: socket.socket, per_read: float) -> None:
        self.connection, self.per_read, self.deadline = connection, per_read, math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RequestDeadline()
        self.connection.settimeout(min(self.per_read, remaining))
        try:
            return self.connection.recv_into(buffer)
        except TimeoutError:
            if self.deadline - time.monotonic() <= 0:
                raise RequestDeadline() from None
            raise
        finally:
            self.connection.settimeout(self.per_read)


def mark_answering(connection: socket.socket) -> None:
    """The answer's status line is out: from now on a write that fails tells that the peer left."""
    _ANSWERING.add(connection)


def _hostname(authority: str) -> str:
    """The host of ``host[:port]`` or ``[v6]:port``, lower case, without a trailing dot."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority[1:]
    if authority.count(":") == 1:
        authority = authority.split(":")[0]
    return authority.rstrip(".")


def _is_ip(name: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, name)
            return True
        except OSError:
            pass
    return False


def foreign_request(host: str | None, origin: str | None, allowed_hosts: str) -> str | None:
    """Why a request comes from where it should not (None when it may be served).

    A ``Host`` that is a name other than ``localhost`` is how DNS rebinding reaches a loopback
    server (a page's own name made to resolve to 127.0.0.1), so only IP literals, ``localhost`` and
    the names in ``allowed_hosts`` are served. An ``Origin`` (browsers send one with every POST)
    must be this server itself: another site's page may not spend this machine's compute.
    A request without a ``Host`` (an HTTP/1.0 client, not a browser) is served.
    """
    names = {name.strip().lower().rstrip(".") for name in allowed_hosts.split(",") if name.strip()}
    if "*" in names:
        return None
    fix = "; pass --allowed-hosts NAME to serve it"
    if host is not None and not _accepted_name(_hostname(host), names):
        return f"the Host header {host.strip()[:100]!r} is not this server's address{fix}"
    if origin is not None:
        scheme, _, authority = origin.strip().partition("://")
        same_site = host is not None and authority.lower() == host.strip().lower()
        if scheme not in ("http", "https") or not (same_site or _hostname(authority) in names):
            return f"requests from the page at Origin {origin.strip()[:100]!r} are not served{fix}"
    return None


def _accepted_name(name: str, allowed: set[str]) -> bool:
    return _is_ip(name) or name in ("localhost", "") or name in allowed


def bind_error(host: str, port: int, error: OSError) -> str:
    """One line for a socket that cannot listen: what, why, and the fix."""
    where = f"cannot listen on {host} port {port}"
    if error.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use (another server?); pass another --port (0 = any free port)"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied (ports below 1024 need privileges); pass a --port >= 1024"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no interface has that address; pass --host 127.0.0.1, ::1, 0.0.0.0 or ::"
    if isinstance(error, socket.gaierror):
        return f"{where}: the host name does not resolve ({error.strerror}); pass an address"
    return f"{where}: {error.strerror or error}"


def refuse(connection: socket.socket, why: str) -> None:
    """Answer a connection beyond a cap without a thread: 503 and close."""
    body = json.dumps({"error": f"{why}; retry shortly", "field": None})
    response = (
        "HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    try:
        connection.settimeout(1.0)
        connection.sendall(response.encode())
    except OSError:
        pass


__all__ = [
    "DeadlineReader",
    "RequestDeadline",
    "bind_error",
    "client_gone",
    "foreign_request",
    "mark_answering",
    "refuse",
]
