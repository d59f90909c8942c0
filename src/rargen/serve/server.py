"""A local web page and JSON API to generate images from a RAR checkpoint and watch them form.

``rargen serve CHECKPOINT --tokenizer TOK`` serves one page (``static/index.html``) and a small API
on the standard library's ``ThreadingHTTPServer`` (no web framework: a page, four routes and SSE
need none):

* ``GET /`` the page; ``GET /health`` liveness and job counts (503 when the decoding loop is
  dead or stalled); ``GET /info`` the model, its class names, the limits and the default
  settings (the page builds its form from it);
* ``POST /generate`` JSON settings -> JSON with base64 PNGs and the settings; with ``image`` (a
  base64 PNG) and ``mask`` (token cells) an edit: the masked cells drawn, the rest kept;
* ``POST /generate/stream`` the same settings -> ``text/event-stream``: ``start``, then
  ``progress`` events with partial images every ``stream_every`` token rows (rows not yet sampled
  are painted grey), then ``done`` with the final PNGs (or ``error``).

Concurrent requests share one decoding batch (``rargen.serve.batching``: continuous batching; a request
joins at the next step and leaves when done), and each image is exactly what
``rargen.sampling.engine.generate`` gives alone: image ``i`` of seed ``s`` uses the per-sample seed
``sample_seed(s, i)`` and its request's own settings, so it depends neither on the batch size nor
on the other requests. Final PNGs carry their settings in PNG text chunks and in their file names.

Safety: loopback by default; a request whose ``Host`` is a name other than ``localhost`` (or one of
``--allowed-hosts``), or whose ``Origin`` is another site, gets 403 (DNS rebinding, cross-site POSTs
from a page the user happens to visit); open connections per client address are capped
(``--max-connections-per-client``), so a few slow clients cannot take every slot; batch size, requests per
minute per client, images decoding at once and queued requests are capped; bad settings get 422 with
the reason; a client that disconnects cancels its job (its rows leave the batch at the next step).
Every request gets an HTTP answer: 400 for a body that is not JSON (also 5000-digit numbers, 30,000
nested brackets), 422 naming the field, 408 for a client that does not send its request within
``Handler.request_deadline`` seconds, 503 beyond ``Server.max_connections`` open connections or
``max_queue`` waiting requests, 500 with a short message for a bug (the server keeps serving). A
client that half-closes its side after the request (``nc -N``) still gets its answer.
"""

from __future__ import annotations

import io
import json
import math
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from torch import Tensor

from rargen.serve.batching import Job
from rargen.serve.connections import (
    DeadlineReader,
    RequestDeadline,
    bind_error,
    client_gone,
    foreign_request,
    mark_answering,
    refuse,
)
from rargen.serve.engine import MAX_BODY_BYTES, Engine, GenerationRequest, ServeConfig
from rargen.serve.fields import RequestError

# ---------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "rargen"
    timeout = 60  # seconds a socket read/write may stall: a client that never sends its body lets go
    request_deadline = 30.0  # seconds to send a whole request (line, headers, body)
    default_request_version = "HTTP/1.0"  # not 0.9: every answer, errors included, has a status line

    # -- every request gets an answer -----------------------------------------------------------

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        refusal = foreign_request(
            self.headers.get("Host"), self.headers.get("Origin"), self.server.engine.config.allowed_hosts
        )
        if refusal is not None:
            self.close_connection = True
            self._answer_if_silent(403, refusal)
            return False
        return True

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a reader with an overall deadline (the socket stays open)
        self._reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._answered = False
        # What an answer before the request line was read needs (send_response logs them).
        self.requestline, self.request_version, self.command = "", self.default_request_version, None
        self._reader.deadline = time.monotonic() + self.request_deadline
        try:
            super().handle_one_request()
        except RequestDeadline:
            self.close_connection = True
            self._answer_if_silent(
                408, f"the request was not complete within {self.request_deadline:g} s; send it at once"
            )
        except (ConnectionError, TimeoutError):  # the client went away mid-answer: nobody to tell
            self.close_connection = True
        except Exception as error:  # noqa: BLE001 - a bug: answer this client, keep serving the rest
            self.close_connection = True
            self.log_error("internal error: %r", error)
            self._answer_if_silent(500, f"internal error ({type(error).__name__}); the server keeps serving")
        finally:
            self._reader.deadline = math.inf  # no deadline while a job runs or an answer streams

    def _answer_if_silent(self, status: int, message: str) -> None:
        if self._answered:
            return
        try:
            self.send_json(status, {"error": message, "field": None}, {"Connection": "close"})
        except OSError:
            pass

    def send_response(self, code: int, message: str | None = None) -> None:
        if code >= 200:
            self._answered = True
            mark_answering(self.connection)
        super().send_response(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (a malformed request line, 414, 431, 501) as JSON too."""
        self.close_connection = True
        self._answer_if_silent(code, message or explain or "bad request")

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    # -- helpers ----------------------------------------------------------------------------

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error: RequestError) -> None:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        self.send_json(error.status, {"error": str(error), "field": error.field}, headers)

    def read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("send the settings as a JSON body with a Content-Length", status=411) from None
        if length < 0:
            raise RequestError(f"Content-Length must be >= 0, got {length}", status=400)
        limit = self.server.engine.max_body_bytes  # MAX_BODY_BYTES, and room for an edit's image
        if length > limit:
            raise RequestError(f"the body is {length} bytes; the limit is {limit}", status=413)
        data = self.rfile.read(length)
        if len(data) < length:
            raise RequestError(f"the body ended after {len(data)} of {length} bytes", status=400)
        oversized = f"the body is {length} bytes; the limit is {MAX_BODY_BYTES} (more for an edit's image)"
        if length > MAX_BODY_BYTES and b'"image"' not in data:  # not an edit: refused unparsed
            raise RequestError(oversized, status=413)
        try:
            body = json.loads(data or b"{}")
        except RecursionError:
            raise RequestError("the body is nested too deeply to be settings", status=400) from None
        except ValueError as error:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
            reason = str(error).split(";")[0][:120]
            raise RequestError(f"the body is not valid JSON settings: {reason}", status=400) from None
        if length > MAX_BODY_BYTES and not (isinstance(body, dict) and "image" in body):
            raise RequestError(oversized, status=413)
        return body

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        engine = self.server.engine
        if path in ("/", "/index.html"):
            page = resources.files("rargen.serve").joinpath("static/index.html").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif path == "/health":
            with engine._lock:
                stats = dict(engine.stats)
            healthy, state = engine.scheduler.healthy()  # a dead or stalled decoding loop is a 503
            body = {"status": "ok" if healthy else "unhealthy", "scheduler": state}
            self.send_json(200 if healthy else 503, {**body, **stats, **engine.scheduler.load()})
        elif path == "/info":
            self.send_json(200, engine.info())
        else:
            self.send_json(404, {"error": f"no route GET {path}; routes: /, /health, /info"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/generate", "/generate/stream"):
            self.send_json(404, {"error": f"no route POST {path}; routes: /generate, /generate/stream"})
            return
        engine = self.server.engine
        try:
            request = engine.parse(self.read_json())
            job = engine.admit(self.client_address[0], request)
        except RequestError as error:
            self.send_error_json(error)
            return
        if path == "/generate":
            self.generate(request, job)
        else:
            self.stream(request, job)

    def job(
        self, request: GenerationRequest, job: Job, cancelled, on_rows=None
    ) -> tuple[str, dict[str, Any] | None]:
        """Wait for one job and count it *before* the answer goes out, so a client that sends its
        next request as soon as it has the answer sees consistent counts.
        Returns (outcome, the ``done`` payload or None)."""
        engine, start, outcome = self.server.engine, time.perf_counter(), "failed"
        try:
            tokens = engine.wait(job, cancelled, on_rows)
            if tokens is None:
                outcome = "cancelled"
                return outcome, None
            images = engine.pngs(tokens, request)
            outcome = "completed"
        except Exception as error:  # keep serving: report it to this client only
            self.log_error("generation failed: %r", error)
            return outcome, {"error": f"generation failed: {error}"}
        finally:
            if outcome == "failed":
                job.cancel()
            engine.release(outcome)
        seconds = time.perf_counter() - start
        return outcome, {"images": images, "settings": request.settings(), "seconds": seconds}

    def generate(self, request: GenerationRequest, job: Job) -> None:
        outcome, payload = self.job(request, job, lambda: client_gone(self.connection))
        if payload is not None:
            self.send_json(200 if outcome == "completed" else 500, payload)

    def stream(self, request: GenerationRequest, job: Job) -> None:
        engine = self.server.engine
        gone = False

        def send(event: str, payload: dict) -> None:
            nonlocal gone
            try:
                self.wfile.write(f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()
            except OSError:  # BrokenPipe / ConnectionReset: the page went away
                gone = True

        def on_rows(rows: int, tokens: Tensor, filled: Tensor | None = None) -> None:
            images = engine.pngs(tokens, rows_done=rows, filled=filled)
            send("progress", {"rows_done": rows, "rows": engine.grid[0], "images": images})

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
        except OSError:
            gone = True
        send(
            "start",
            {
                "settings": request.settings(),
                "rows": engine.grid[0],
                "unit": "token rows" if engine.progressive else "tokens",
                "size": engine.image_size,
            },
        )
        outcome, payload = self.job(request, job, lambda: gone or client_gone(self.connection), on_rows)
        if payload is not None:
            send("done" if outcome == "completed" else "error", payload)


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that owns an Engine; one thread per connection, at most
    ``max_connections`` of them (more get an immediate 503), on IPv4 or IPv6."""

    daemon_threads = True  # a stuck client never blocks shutdown
    request_queue_size = 128  # the listen backlog (socketserver's default of 5 made bursts queue)
    max_connections = 64  # open connections served at once; each holds a thread

    def __init__(self, engine: Engine, *, quiet: bool = False) -> None:
        self.engine, self.quiet = engine, quiet
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._clients: dict[str, int] = {}  # open connections per client address
        self._clients_lock = threading.Lock()
        host, port = engine.config.host, engine.config.port
        self.address_family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        try:
            super().__init__((host.strip("[]"), port), Handler)
        except OverflowError:
            raise ValueError(f"--port {port} is out of range; pass 0-65535 (0 = any free port)") from None
        except OSError as error:
            raise ValueError(bind_error(host, port, error)) from None

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "::" serves IPv4 clients too (dual stack), as "0.0.0.0" serves all IPv4 interfaces.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request, client_address) -> None:
        address, cap = client_address[0], self.engine.config.max_connections_per_client
        with self._clients_lock:
            held = self._clients.get(address, 0)
            if cap and held >= cap:
                why = f"this address holds {cap} open connections (--max-connections-per-client)"
            elif not self._slots.acquire(blocking=False):
                why = f"the server is at its {self.max_connections} open connections"
            else:
                why, self._clients[address] = None, held + 1
        if why is not None:
            refuse(request, why)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(address)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])

    def _release(self, address: str) -> None:
        with self._clients_lock:
            self._clients[address] -= 1
            if not self._clients[address]:
                del self._clients[address]
        self._slots.release()

    def server_close(self) -> None:
        # The decoding thread is a daemon: left running, it can be inside a torch kernel while the
        # interpreter tears down, which aborts the process (SIGABRT) instead of exiting 0.
        super().server_close()
        self.engine.scheduler.stop()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return (
            f"http://[{host}]:{port}" if self.address_family == socket.AF_INET6 else f"http://{host}:{port}"
        )


def make_server(
    checkpoint: str | Path, tokenizer: str | Path, config: ServeConfig | None = None, *, quiet: bool = False
) -> Server:
    """Load a generator and a tokenizer (rargen checkpoint folders) and bind a server (not started)."""
    from rargen.checkpoint import checkpoint_hash, load
    from rargen.tokenizers.base import check_pair

    config = config or ServeConfig()
    model = load(checkpoint, device=config.device)
    vq = load(tokenizer, device=config.device)
    check_pair(model, vq, checkpoint, tokenizer)  # the message names the folders
    provenance = {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": checkpoint_hash(checkpoint)}
    return Server(Engine(model, vq, config, provenance), quiet=quiet)


def serve(checkpoint: str | Path, tokenizer: str | Path, config: ServeConfig | None = None) -> None:
    """Serve the page and API until interrupted (Ctrl-C)."""
    config = config or ServeConfig()
    server = make_server(checkpoint, tokenizer, config)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {config.host}: anyone who can reach this machine can use the GPU/CPU")
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and SIGTERM stop the server cleanly, also when the parent started this process
        # with SIGINT ignored (as shells do for background jobs).
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.default_int_handler)
    print(f"rargen serve: {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = [
    "Server",
    "make_server",
    "serve",
]
