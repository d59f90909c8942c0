"""A local web page and JSON API to generate images from a RAR checkpoint and watch them form.

``rargen serve CHECKPOINT --tokenizer TOK`` serves one page (``static/index.html``) and a small API
on the standard library's ``ThreadingHTTPServer`` (no web framework: a page, four routes and SSE
need none):

* ``GET /`` the page; ``GET /health`` liveness and job counts; ``GET /info`` the model, its class
  names, the limits and the default settings (the page builds its form from it);
* ``POST /generate`` JSON settings -> JSON with base64 PNGs and the settings;
* ``POST /generate/stream`` the same settings -> ``text/event-stream``: ``start``, then
  ``progress`` events with partial images every ``stream_every`` token rows (rows not yet sampled
  are painted grey), then ``done`` with the final PNGs (or ``error``).

Concurrent requests share one decoding batch (``rargen.batching``: continuous batching; a request
joins at the next step and leaves when done), and each image is exactly what
``rargen.sampling.generate`` gives alone: image ``i`` of seed ``s`` uses the per-sample seed
``sample_seed(s, i)`` and its request's own settings, so it depends neither on the batch size nor
on the other requests. Final PNGs carry their settings in PNG text chunks and in their file names.

Safety: loopback by default; batch size, requests per minute per client, images decoding at once
and queued requests are capped; bad settings get 422 with the reason; a client that disconnects
cancels its job (its rows leave the batch at the next step). Every request gets an HTTP answer: 400
for a body that is not JSON (also 5000-digit numbers, 30,000 nested brackets), 422 naming the
field, 408 for a client that does not send its request within ``Handler.request_deadline``
seconds, 503 beyond ``Server.max_connections`` open connections or ``max_queue`` waiting requests,
500 with a short message for a bug (the server keeps serving). A client that half-closes its side
after the request (``nc -N``) still gets its answer.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import math
import queue
import re
import secrets
import select
import signal
import socket
import struct
import threading
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rargen.batching import BatchScheduler, Job, QueueFull, retry_after
from rargen.decoding import prepare_for_decoding
from rargen.model import RAR
from rargen.sampling import SampleConfig, draw_noise, sample_seed
from rargen.tokenizer import codes_from_sequence

MAX_BODY_BYTES = 64 * 1024
MAX_SEED = 2**63 - 1
GREY = 0.5  # the colour of token rows not sampled yet


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen and how much work one server accepts."""

    host: str = "127.0.0.1"  # loopback: reachable from this machine only
    port: int = 8000  # 0 = any free port
    max_batch_size: int = 8  # images per request
    max_rows: int = 16  # images decoding at once in the shared batch (all requests together)
    max_queue: int = 32  # requests waiting for rows; beyond it 503 with Retry-After
    rate_limit: int = 30  # generation requests per minute per client address; 0 = no limit
    stream_every: int = 0  # token rows between partial images; 0 = about 8 updates per image
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rows < self.max_batch_size:
            raise ValueError(
                f"ServeConfig.max_rows ({self.max_rows}) must be >= max_batch_size ({self.max_batch_size}): "
                "a request of max_batch_size images would never fit in the batch"
            )
        for name in ("port", "rate_limit", "stream_every", "max_queue"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServeConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.port > 65535:
            raise ValueError(f"ServeConfig.port must be in [0, 65535] (0 = any free port), got {self.port}")


class RequestError(ValueError):
    """A rejected request: HTTP ``status`` with a message naming the bad ``field``."""

    def __init__(self, message: str, field: str | None = None, status: int = 422, retry_after: int = 0):
        super().__init__(message)
        self.field, self.status, self.retry_after = field, status, retry_after


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class GenerationRequest:
    """Validated settings of one generation request (what the PNGs record)."""

    class_id: int
    class_name: str | None
    cfg_scale: float
    cfg_power: float
    temperature: float
    top_k: int
    top_p: float
    seed: int
    batch_size: int
    stream_every: int

    @property
    def sample_config(self) -> SampleConfig:
        return SampleConfig(self.cfg_scale, self.cfg_power, self.temperature, self.top_k, self.top_p)

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        del out["stream_every"]  # how it was shown, not what was sampled
        return out


def _shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, shortened: an error message never echoes a 5000-digit number whole."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        return "an integer too large to show"
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} characters)"


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {_shown(value)}", name)
    # Compare before converting: float() of a 400-digit JSON integer overflows.
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {_shown(value)}", name)
    if not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{name} must be in {interval}, got {_shown(value)}", name)
    return float(value)


def _integer(body: dict, name: str, default: int, low: int, high: int, hint: str = "") -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {_shown(value)}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be in [{low}, {high}]{hint}, got {_shown(value)}", name)
    return value


# ---------------------------------------------------------------------------------------------
# The engine: validation, admission, the shared decoding batch, PNGs


class Engine:
    """Generates for the HTTP layer: validates settings, admits requests, and decodes them all in
    one continuously batched ``rargen.batching.BatchScheduler`` (``start``/``stop`` its thread)."""

    def __init__(
        self, model: RAR, tokenizer: torch.nn.Module, config: ServeConfig, checkpoint: dict | None = None
    ):
        if not isinstance(model, RAR):
            raise ValueError(f"the checkpoint holds a {type(model).__name__}, not a RAR generator")
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no decode(codes) method")
        cfg = model.config
        # What the tokenizer decodes: a (B, h, w) grid (2D tokenizers; painted row by row while
        # sampling) or a (B, K) sequence (TiTok's 1D tokens: no rows to paint, so progress is a
        # token count and the images come when the sequence is complete).
        probe_codes = codes_from_sequence(tokenizer, torch.zeros(1, cfg.num_image_tokens, dtype=torch.int64))
        book = getattr(tokenizer, "codebook_size", cfg.codebook_size)
        if book != cfg.codebook_size:
            raise ValueError(
                f"the tokenizer has {book} codes but the generator predicts {cfg.codebook_size}; "
                "pass the tokenizer the generator was trained with"
            )
        self.model, self.tokenizer, self.config = model.eval(), tokenizer.eval(), config
        # (token rows, tokens per row): (h, w) for a grid, (K, 1) for a 1D sequence (a "row" is a token)
        self.progressive = probe_codes.ndim == 3
        self.grid = tuple(probe_codes.shape[1:]) if self.progressive else (cfg.num_image_tokens, 1)
        names = getattr(model, "checkpoint_extra", {}).get("class_names")
        if names is not None and len(names) != cfg.num_classes:
            raise ValueError(f"the checkpoint has {len(names)} class names for {cfg.num_classes} classes")
        self.class_names: list[str] | None = [str(n) for n in names] if names is not None else None
        self.checkpoint = checkpoint or {}
        with torch.inference_mode():
            probe = self.tokenizer.decode(probe_codes.to(config.device))
        self.image_size = (int(probe.shape[-2]), int(probe.shape[-1]))
        # Prepared for decoding once (packed for oneDNN on CPUs), not per request.
        self.scheduler = BatchScheduler(prepare_for_decoding(self.model), config.max_rows, config.max_queue)
        self.scheduler.start()  # a daemon thread that sleeps while no request is decoding
        self._lock = threading.Lock()
        self._rate: dict[str, deque[float]] = {}
        self.stats = {"active_jobs": 0, "completed": 0, "cancelled": 0, "failed": 0}

    # -- settings -------------------------------------------------------------------------

    @property
    def default_stream_every(self) -> int:
        return self.config.stream_every or max(1, self.grid[0] // 8)

    def info(self) -> dict[str, Any]:
        defaults = asdict(SampleConfig())
        return {
            "model": {**asdict(self.model.config), **self.checkpoint},
            "class_names": self.class_names,
            "num_classes": self.model.config.num_classes,
            "grid": list(self.grid),
            "progressive": self.progressive,  # False for 1D tokens: no partial images
            "image_size": list(self.image_size),
            "limits": {
                "max_batch_size": self.config.max_batch_size,
                "max_rows": self.config.max_rows,
                "max_queue": self.config.max_queue,
                "rate_limit_per_minute": self.config.rate_limit,
            },
            "load": self.scheduler.load(),
            "defaults": {**defaults, "batch_size": 1, "stream_every": self.default_stream_every},
        }

    def parse(self, body: Any) -> GenerationRequest:
        """Validate a JSON request body; RequestError (422) names the first bad field."""
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise RequestError(f"unknown fields {unknown}; valid fields: {sorted(_FIELDS)}", unknown[0])
        class_id, class_name = self._class(body)
        cfg = self.model.config
        return GenerationRequest(
            class_id=class_id,
            class_name=class_name,
            cfg_scale=_number(body, "cfg_scale", 1.0, 0.0, 100.0),
            cfg_power=_number(body, "cfg_power", 0.0, 0.0, 10.0),
            temperature=_number(body, "temperature", 1.0, 0.0, 10.0, low_open=True),
            top_k=_integer(body, "top_k", 0, 0, cfg.codebook_size, " (0 = off)"),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            seed=_integer(body, "seed", secrets.randbelow(2**31), 0, MAX_SEED),
            batch_size=_integer(
                body, "batch_size", 1, 1, self.config.max_batch_size, " (the server's --max-batch-size)"
            ),
            stream_every=_integer(
                body, "stream_every", self.default_stream_every, 1, self.grid[0], " token rows"
            ),
        )

    def _class(self, body: dict) -> tuple[int, str | None]:
        if "class" not in body:
            raise RequestError(
                "class is required: a class id or, when the checkpoint has names, a name", "class"
            )
        value, C = body["class"], self.model.config.num_classes
        # ASCII digits only: str.isdigit() is also true of '²' and '٣', which int() refuses or reads.
        if isinstance(value, str) and not re.fullmatch(r"[0-9]+", value.strip()):
            if self.class_names is None:
                raise RequestError(
                    f"class {_shown(value)} is a name but this checkpoint has no class names; "
                    f"pass an id in [0, {C - 1}]",
                    "class",
                )
            lowered = [n.lower() for n in self.class_names]
            if value.strip().lower() not in lowered:
                raise RequestError(
                    f"class {_shown(value)} is not one of this checkpoint's class names", "class"
                )
            index = lowered.index(value.strip().lower())
            return index, self.class_names[index]
        if isinstance(value, str):
            digits = value.strip().lstrip("0") or "0"
            if len(digits) > 18:  # no class id is that long; int() of 5000 digits would raise
                raise RequestError(f"class must be in [0, {C - 1}], got {_shown(value)}", "class")
            value = int(digits)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"class must be an integer id or a name, got {_shown(value)}", "class")
        if not 0 <= value < C:
            raise RequestError(f"class must be in [0, {C - 1}], got {_shown(value)}", "class")
        return value, self.class_names[value] if self.class_names else None

    # -- admission --------------------------------------------------------------------------

    def admit(self, client: str, request: GenerationRequest) -> Job:
        """Queue ``request`` for ``client``, or raise RequestError 429 (rate) / 503 (queue full)."""
        now = time.monotonic()
        with self._lock:
            if self.config.rate_limit:
                times = self._rate.setdefault(client, deque())
                while times and now - times[0] >= 60.0:
                    times.popleft()
                if len(times) >= self.config.rate_limit:
                    wait = max(1, math.ceil(60.0 - (now - times[0])))
                    raise RequestError(
                        f"rate limit: at most {self.config.rate_limit} generations per minute per client; "
                        f"retry in {wait} s",
                        status=429,
                        retry_after=wait,
                    )
            job = self.job(request)
            try:
                self.scheduler.submit(job)
            except QueueFull:
                raise RequestError(
                    f"the server is busy: {self.config.max_queue} requests are waiting for the batch; "
                    "retry shortly (the server's --max-queue)",
                    status=503,
                    retry_after=retry_after(self.scheduler.load()),
                ) from None
            if self.config.rate_limit:
                times.append(now)
            self.stats["active_jobs"] += 1
            return job

    def job(self, request: GenerationRequest) -> Job:
        """The scheduler's job for a request: image ``i`` sampled with ``sample_seed(seed, i)``."""
        cfg = self.model.config
        seeds = [sample_seed(request.seed, i) for i in range(request.batch_size)]
        with torch.inference_mode():
            noise = draw_noise(
                (request.batch_size, cfg.num_image_tokens, cfg.codebook_size), self.model.device, seeds=seeds
            )
        return Job(
            labels=[request.class_id] * request.batch_size,
            config=request.sample_config,
            noise=noise,
            width=self.grid[1],
            stream_every=request.stream_every,
        )

    def release(self, outcome: str) -> None:
        with self._lock:
            self.stats["active_jobs"] -= 1
            self.stats[outcome] += 1

    def wait(self, job: Job, cancelled, on_rows=None) -> Tensor | None:
        """Wait for ``job``'s tokens (B, L), calling ``on_rows(rows_done, tokens)`` on progress;
        None when ``cancelled()`` turned true first (the job is cancelled: its rows are freed at
        the next step). RuntimeError when the batch failed."""
        while True:
            try:
                kind, *payload = job.events.get(timeout=0.02)
            except queue.Empty:
                if cancelled():
                    job.cancel()
                    return None
                continue
            if kind == "done":
                return payload[0]
            if kind == "error":
                raise RuntimeError(payload[0])
            if cancelled():
                job.cancel()
                return None
            if on_rows is not None:
                on_rows(*payload)

    def images(self, tokens: Tensor, rows_done: int | None = None) -> Tensor:
        """Decode tokens (B, L) to uint8 images (B, H, W, 3); rows from ``rows_done`` on are grey.

        A 1D tokenizer has no rows to paint: a partial sequence gives no images (B, 0, 0, 3)."""
        h, w = self.grid
        partial = rows_done is not None and rows_done < h
        if partial and not self.progressive:
            return torch.zeros(tokens.shape[0], 0, 0, 3, dtype=torch.uint8)
        codes = codes_from_sequence(self.tokenizer, tokens).clone()
        if partial:
            # Repeat the last finished row below it: a guess the decoder blends less harshly than 0s.
            codes[:, rows_done:] = codes[:, max(rows_done - 1, 0)][:, None] if rows_done else 0
        with torch.inference_mode():
            images = self.tokenizer.decode(codes).float().clamp(0, 1)
            if partial:
                images[:, :, rows_done * images.shape[2] // h :] = GREY
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def pngs(self, tokens: Tensor, request: GenerationRequest | None = None, rows_done: int | None = None):
        """Base64 PNGs of a batch; final ones (with ``request``) carry their settings."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        out = []
        images = self.images(tokens, rows_done)
        if images.shape[1] == 0:  # a partial 1D sequence: nothing to show yet
            return []
        for index, pixels in enumerate(images):
            buffer, info = io.BytesIO(), None
            if request is not None:
                info = PngInfo()
                for key, value in self.png_text(request, index).items():
                    info.add_text(key, value)
            Image.fromarray(pixels.numpy()).save(buffer, format="PNG", pnginfo=info)
            encoded = base64.b64encode(buffer.getvalue()).decode()
            if request is None:
                out.append(encoded)
            else:
                out.append({"png": encoded, "index": index, "filename": self.filename(request, index)})
        return out

    def png_text(self, request: GenerationRequest, index: int) -> dict[str, str]:
        from rargen.version import __version__

        settings = {**request.settings(), "index": index, "sample_seed": sample_seed(request.seed, index)}
        return {
            "Software": f"rargen {__version__}",
            "rargen:settings": json.dumps(settings),
            "rargen:checkpoint": json.dumps(self.checkpoint),
        }

    def filename(self, request: GenerationRequest, index: int) -> str:
        name = re.sub(r"[^A-Za-z0-9]+", "-", request.class_name or "").strip("-")[:32]
        name = f"c{request.class_id}" + (f"-{name}" if name else "")
        return (
            f"rargen_{name}_seed{request.seed}_{index}_cfg{request.cfg_scale:g}_pow{request.cfg_power:g}"
            f"_t{request.temperature:g}_k{request.top_k}_p{request.top_p:g}.png"
        )


_FIELDS = {
    "class",
    "cfg_scale",
    "cfg_power",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "batch_size",
    "stream_every",
}


# ---------------------------------------------------------------------------------------------
# HTTP


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


class _DeadlineReader(io.RawIOBase):
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


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "rargen"
    timeout = 60  # seconds a socket read/write may stall: a client that never sends its body lets go
    request_deadline = 30.0  # seconds to send a whole request (line, headers, body)
    default_request_version = "HTTP/1.0"  # not 0.9: every answer, errors included, has a status line

    # -- every request gets an answer -----------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a reader with an overall deadline (the socket stays open)
        self._reader = _DeadlineReader(self.connection, self.timeout)
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
            _ANSWERING.add(self.connection)
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
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}", status=413)
        data = self.rfile.read(length)
        if len(data) < length:
            raise RequestError(f"the body ended after {len(data)} of {length} bytes", status=400)
        try:
            return json.loads(data or b"{}")
        except RecursionError:
            raise RequestError("the body is nested too deeply to be settings", status=400) from None
        except ValueError as error:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
            reason = str(error).split(";")[0][:120]
            raise RequestError(f"the body is not valid JSON settings: {reason}", status=400) from None

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        engine = self.server.engine
        if path in ("/", "/index.html"):
            page = resources.files("rargen").joinpath("static/index.html").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif path == "/health":
            with engine._lock:
                stats = dict(engine.stats)
            self.send_json(200, {"status": "ok", **stats, **engine.scheduler.load()})
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

        def on_rows(rows: int, tokens: Tensor) -> None:
            images = engine.pngs(tokens, rows_done=rows)
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
        host, port = engine.config.host, engine.config.port
        self.address_family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        try:
            super().__init__((host.strip("[]"), port), Handler)
        except OverflowError:
            raise ValueError(f"--port {port} is out of range; pass 0-65535 (0 = any free port)") from None
        except OSError as error:
            raise ValueError(_bind_error(host, port, error)) from None

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "::" serves IPv4 clients too (dual stack), as "0.0.0.0" serves all IPv4 interfaces.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            _refuse(request, self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return (
            f"http://[{host}]:{port}" if self.address_family == socket.AF_INET6 else f"http://{host}:{port}"
        )


def _bind_error(host: str, port: int, error: OSError) -> str:
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


def _refuse(connection: socket.socket, limit: int) -> None:
    """Answer a connection beyond the cap without a thread: 503 and close."""
    body = json.dumps(
        {"error": f"the server is at its {limit} open connections; retry shortly", "field": None}
    )
    response = (
        "HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    try:
        connection.settimeout(1.0)
        connection.sendall(response.encode())
    except OSError:
        pass

    def server_close(self) -> None:
        super().server_close()
        self.engine.scheduler.stop()


def make_server(
    checkpoint: str | Path, tokenizer: str | Path, config: ServeConfig = ServeConfig(), *, quiet: bool = False
) -> Server:
    """Load a generator and a tokenizer (rargen checkpoint folders) and bind a server (not started)."""
    from rargen.checkpoint import checkpoint_hash, load

    model = load(checkpoint, device=config.device)
    vq = load(tokenizer, device=config.device)
    provenance = {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": checkpoint_hash(checkpoint)}
    return Server(Engine(model, vq, config, provenance), quiet=quiet)


def serve(checkpoint: str | Path, tokenizer: str | Path, config: ServeConfig = ServeConfig()) -> None:
    """Serve the page and API until interrupted (Ctrl-C)."""
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
    "Engine",
    "GenerationRequest",
    "RequestError",
    "ServeConfig",
    "Server",
    "make_server",
    "serve",
]
