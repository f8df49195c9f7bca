"""The HTTP server: Tornado's `HTTPServer` with the connection-level limits vsproxy needs.

What it adds, and where Tornado does the work:

- **Timeouts.** Tornado's header timeout runs from the moment a connection starts waiting for a
  request until its whole head has arrived, so it covers a slow client (headers a byte at a
  time) as well as an idle keep-alive connection. Each connection gets its own parameters: its
  first request has `server.header_timeout_seconds`; once a head is in, the wait for the next one
  is the idle keep-alive wait, `server.idle_timeout_seconds`. `server.body_timeout_seconds` bounds
  reading a body. None of them applies to WebSocket or MJPEG viewers: those streams are detached
  from the HTTP layer once their request is in, and have their own ping and stall checks.
- **A cap on open connections** (`limits.max_connections`, viewers included), counted when a
  connection is accepted and released when its socket closes (whoever closes it). Over the cap
  a new connection is closed at once, before anything is read, and a warning is logged at most
  once per `LOG_INTERVAL_SECONDS`.
- **An accept loop that degrades.** Out of file descriptors (EMFILE/ENFILE), Tornado's accept
  loop would spin at full CPU, logging a traceback per attempt. Here accepting pauses for
  `ACCEPT_PAUSE_SECONDS` (waiting clients stay in the listen backlog), one line is logged at most
  once per `LOG_INTERVAL_SECONDS`, and accepting resumes by itself.
- **Oversized request heads** get an answer instead of a dropped connection: a request target
  over `server.max_url_bytes` gets 414; a head over `server.max_header_bytes` (where Tornado gives
  up reading and closes the stream) gets 431, or 414 when the request line alone is that long.
  Both bodies are the usual `{"success": false, "error": "..."}`.

`raise_open_file_limit` raises the process's soft RLIMIT_NOFILE to the hard limit at start-up.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import json
import logging
import resource
import socket
import ssl
import time
from http import HTTPStatus
from typing import Any

import tornado.httpserver
from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream, UnsatisfiableReadError
from tornado.netutil import ssl_wrap_socket

from .config import ServerConfig

log = logging.getLogger("vsproxy.server")

ACCEPT_PAUSE_SECONDS = 0.25  # how long accepting stops after accept() failed (out of descriptors)
LOG_INTERVAL_SECONDS = 10.0  # at most one warning per kind per this long
ACCEPT_BATCH = 128  # connections accepted per readiness event, so other work is not starved
# Descriptors kept beside client connections: listening sockets, upstreams, the event loop, logs.
FD_RESERVE = 64
JSON_CONTENT_TYPE = "application/json; charset=UTF-8"


def raise_open_file_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (logged when it changes), warn when
    `limits.max_connections` does not fit under it, and return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses RLIM_INFINITY for open files; 1048576 is its usual ceiling (fs.nr_open).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        else:
            log.info("raised the open-file limit from %d to %d", soft, target)
            soft = target
    if soft != resource.RLIM_INFINITY and max_connections + FD_RESERVE > soft:
        log.warning("limits.max_connections (%d) does not fit under the open-file limit (%d): near it, "
                    "new connections wait while accepting pauses", max_connections, soft)
    return soft


def is_loopback(host: str) -> bool:
    """Is a bound address reachable only from this machine?"""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def url_for(scheme: str, host: str, port: int) -> str:
    """http://host:port/ with an IPv6 address in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}/"


class ConnectionCount:
    """Open client connections of every `ProxyServer` of one Proxy, against `limits.max_connections`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class _ThrottledWarning:
    """One log line per `LOG_INTERVAL_SECONDS` at most, counting what it did not log."""

    def __init__(self) -> None:
        self._next = 0.0
        self._suppressed = 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last report)"
        log.warning(message, *args)
        self._next = now + LOG_INTERVAL_SECONDS
        self._suppressed = 0


def _error_body(error: str) -> bytes:
    return json.dumps({"success": False, "error": error}).encode()


def _raw_json_response(status: int, error: str) -> bytes:
    """A whole HTTP/1.1 response closing the connection, written straight to the socket."""
    body = _error_body(error)
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {JSON_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _ServerStreamMixin:
    """What a client connection's stream adds to Tornado's: it releases its place in the
    connection count when its socket closes, and answers a head Tornado gave up on."""

    # Set by ProxyServer right after construction.
    _vsproxy_server: ProxyServer

    def close(self, exc_info: Any = False) -> None:
        # Tornado closes the stream with UnsatisfiableReadError when the head outgrows
        # max_header_size. The head is read with the one regex read of a server connection (a
        # chunked body's size lines use read_until), so a pending regex read means "the head".
        stream: Any = self
        if (isinstance(exc_info, UnsatisfiableReadError) and not stream.closed()
                and stream._read_regex is not None):
            self._vsproxy_server._answer_oversized_head(stream)
        super().close(exc_info)  # type: ignore[misc]

    def close_fd(self) -> None:
        super().close_fd()  # type: ignore[misc]
        self._vsproxy_server.connections.open -= 1


class _ServerStream(_ServerStreamMixin, IOStream):
    pass


class _ServerSSLStream(_ServerStreamMixin, SSLIOStream):
    pass


class _Acceptor:
    """Accepts connections on one listening socket; pauses when accept() fails instead of spinning."""

    def __init__(self, sock: socket.socket, server: ProxyServer) -> None:
        self.sock = sock
        self.server = server
        self.io_loop = IOLoop.current()
        self._resume: object | None = None  # the pending call_later while paused
        self._closed = False
        self.io_loop.add_handler(sock, self._ready, IOLoop.READ)

    def _ready(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._closed:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return  # everything waiting has been accepted
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the backlog
            except OSError as exc:
                # EMFILE/ENFILE (out of descriptors), ENOBUFS/ENOMEM: retrying at once would spin.
                self._pause()
                self.server.accept_warning.warn(
                    "cannot accept connections: %s (%s, %d open); pausing accepts %g s at a time",
                    exc.strerror or exc, errno.errorcode.get(exc.errno or 0, "?"),
                    self.server.connections.open, ACCEPT_PAUSE_SECONDS)
                return
            self.server.connection_accepted(connection, address)

    def _pause(self) -> None:
        self.io_loop.remove_handler(self.sock)
        self._resume = self.io_loop.call_later(ACCEPT_PAUSE_SECONDS, self._resumed)

    def _resumed(self) -> None:
        self._resume = None
        if not self._closed:
            self.io_loop.add_handler(self.sock, self._ready, IOLoop.READ)

    def close(self) -> None:
        self._closed = True
        if self._resume is not None:
            self.io_loop.remove_timeout(self._resume)
        else:
            self.io_loop.remove_handler(self.sock)
        self.sock.close()


class _RequestGuard(httputil.HTTPMessageDelegate):
    """Wraps the application's delegate for one request: answers 414 for a request target over
    `server.max_url_bytes` itself, and switches the connection to its idle timeout once the head
    is in (the next wait on this connection is for a keep-alive request)."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, connection: HTTP1Connection,
                 server: ProxyServer) -> None:
        self.delegate = delegate
        self.connection = connection
        self.server = server
        self.refused = False

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Any:
        settings = self.server.server_config
        self.connection.params.header_timeout = settings.idle_timeout_seconds
        target = getattr(start_line, "path", "")
        if len(target) > settings.max_url_bytes:
            self.refused = True
            log.info("414 from %s: request target of %d bytes", _peer(self.connection), len(target))
            body = _error_body(f"Request target longer than {settings.max_url_bytes} bytes")
            self.connection.write_headers(
                httputil.ResponseStartLine("HTTP/1.1", 414, HTTPStatus(414).phrase),
                # Tornado closes a connection answered before its request was read, so say so.
                httputil.HTTPHeaders({"Content-Type": JSON_CONTENT_TYPE, "Content-Length": str(len(body)),
                                      "Connection": "close"}),
                body)
            self.connection.finish()
            return None
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return None if self.refused else self.delegate.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.delegate.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.delegate.on_connection_close()


def _peer(connection: HTTP1Connection) -> str:
    return getattr(connection.context, "remote_ip", None) or "?"


class ProxyServer(tornado.httpserver.HTTPServer):
    """vsproxy's HTTP server (see the module docstring): `ProxyServer(app, server_config=config.server,
    connections=ConnectionCount(limit), ssl_options=...)`, then `listen(port, address)`."""

    def initialize(self, request_callback: Any, *, server_config: ServerConfig,  # type: ignore[override]
                   connections: ConnectionCount, ssl_options: ssl.SSLContext | None = None) -> None:
        self.server_config = server_config
        self.connections = connections
        self.accept_warning = _ThrottledWarning()
        self.limit_warning = _ThrottledWarning()
        self._acceptors: list[_Acceptor] = []
        super().initialize(
            request_callback,
            ssl_options=ssl_options,
            max_header_size=self.server_config.max_header_bytes,
            idle_connection_timeout=self.server_config.header_timeout_seconds,  # Tornado's header timeout
            body_timeout=self.server_config.body_timeout_seconds,
        )

    # -- accepting --------------------------------------------------------------------------

    def add_sockets(self, sockets: Any) -> None:
        # Our own accept handler instead of tornado.netutil.add_accept_handler (see _Acceptor).
        for sock in sockets:
            self._acceptors.append(_Acceptor(sock, self))

    def stop(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []
        super().stop()

    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket, as bound (port 0 resolved)."""
        return [acceptor.sock.getsockname()[:2] for acceptor in self._acceptors]

    def connection_accepted(self, connection: socket.socket, address: Any) -> None:
        """Count a new connection against the cap (closing it at once beyond) and serve it."""
        if self.connections.open >= self.connections.limit:
            connection.close()
            self.limit_warning.warn("refusing connections: limits.max_connections (%d) are open",
                                    self.connections.limit)
            return
        self.connections.open += 1
        stream: IOStream
        try:
            if self.ssl_options is not None:
                connection = ssl_wrap_socket(connection, self.ssl_options, server_side=True,
                                             do_handshake_on_connect=False)
                stream = _ServerSSLStream(connection, max_buffer_size=self.max_buffer_size,
                                          read_chunk_size=self.read_chunk_size)
            else:
                stream = _ServerStream(connection, max_buffer_size=self.max_buffer_size,
                                       read_chunk_size=self.read_chunk_size)
        except OSError as exc:  # closed while being set up, as a port scan does
            log.debug("connection from %s dropped while being set up: %s", address, exc)
            connection.close()
            self.connections.open -= 1
            return
        stream._vsproxy_server = self  # type: ignore[attr-defined]
        self.handle_stream(stream, address)

    # -- per-connection timeouts and refusals ----------------------------------------------------

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        # Each connection gets its own parameters: _RequestGuard changes its header timeout to
        # the idle timeout after the first request. HTTPServer reads conn_params here only.
        shared = self.conn_params
        self.conn_params = copy.copy(shared)
        try:
            super().handle_stream(stream, address)
        finally:
            self.conn_params = shared

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        assert isinstance(request_conn, HTTP1Connection)
        return _RequestGuard(delegate, request_conn, self)

    def _answer_oversized_head(self, stream: Any) -> None:
        """Write 431 (or 414 when not even the request line fits) to a stream Tornado is closing
        because the head outgrew max_header_size. One small write straight to the socket: the
        stream is closing, and a client that sent a whole head is reading."""
        limit = self.server_config.max_header_bytes
        if stream._read_buffer.find(b"\n", 0, limit) == -1:
            status, error = 414, f"Request line longer than {limit} bytes"
        else:
            status, error = 431, f"Request headers larger than {limit} bytes"
        try:
            log.info("%d from %s: request head over %d bytes", status, stream.socket.getpeername()[0], limit)
            stream.socket.send(_raw_json_response(status, error))
        except OSError:
            pass  # the client went away, or its buffer is full: the close says enough
