"""A local HTTP server on 127.0.0.1 that answers like the Hugging Face Hub (and a plain file host).

Hub protocol, as huggingface_hub's ``hf_hub_download`` uses it: ``HEAD`` then ``GET``
``/{owner}/{repo}/resolve/{revision}/{file}``, answered with ``X-Repo-Commit`` (the commit the
revision points to), ``ETag`` / ``X-Linked-Etag`` (for LFS files, the content's SHA-256),
``X-Linked-Size`` and ``Content-Length``; ``Range: bytes=N-`` gets ``206`` with
``Content-Range``; a missing file is ``404`` with ``X-Error-Code: EntryNotFound``. Plain files are
served at ``/{host}/{path}`` (what ``RARGEN_MIRROR`` maps ``https://host/path`` to).

Every request is counted in ``requests``; ``cut_next`` makes the next GET of a path send only
that many bytes of the body and drop the connection (an interrupted download).
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import load_file

from rargen.convert import to_official
from rargen.model import RAR, ModelConfig

DATA = Path(__file__).parent / "data"

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # "owner/repo/file" (Hub) or "host/path" (plain)
        self.claimed_sha256: dict[str, str] = {}  # path -> the LFS digest announced instead of the real one
        self.cut_next: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_hub_file(self, repo: str, filename: str, data: bytes) -> None:
        self.files[f"{repo}/{filename}"] = data

    def add_plain_file(self, url: str, data: bytes) -> None:
        self.files[re.sub(r"^https?://", "", url)] = data

    def count(self, method: str | None = None) -> int:
        return sum(1 for m, _, _ in self.requests if method is None or m == method)

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        with self.lock:
            self.requests.append((handler.command, handler.path, handler.headers.get("Range")))
        path = handler.path.split("?")[0].lstrip("/")
        hub_match = re.match(r"^([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        headers: dict[str, str] = {}
        if hub_match:
            repo, revision, filename = hub_match.groups()
            key = f"{repo}/{filename}"
            headers["X-Repo-Commit"] = COMMIT
            if revision not in ("main", COMMIT):
                return self._error(handler, 404, {"X-Error-Code": "RevisionNotFound"})
            if key not in self.files:
                return self._error(handler, 404, {**headers, "X-Error-Code": "EntryNotFound"})
            data = self.files[key]
            digest = self.claimed_sha256.get(key, hashlib.sha256(data).hexdigest())
            headers |= {
                "ETag": f'"{digest}"',
                "X-Linked-Etag": f'"{digest}"',
                "X-Linked-Size": str(len(data)),
            }
        else:
            key = path
            if key not in self.files:
                return self._error(handler, 404, {})
            data = self.files[key]
        start = 0
        status = 200
        ranged = handler.headers.get("Range")
        if ranged and body:
            start = int(re.match(r"bytes=(\d+)-", ranged).group(1))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if not body:
            return
        cut = self.cut_next.pop(key, None)
        if cut is not None:
            handler.wfile.write(payload[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)  # the body stops short of Content-Length
            return
        handler.wfile.write(payload)

    @staticmethod
    def _error(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


@contextmanager
def serving_hub(tmp_path: Path, monkeypatch) -> Iterator[FakeHub]:
    """A running FakeHub that huggingface_hub and rargen's plain downloads talk to, with an empty
    cache under ``tmp_path`` (``monkeypatch`` undoes the environment afterwards)."""
    import huggingface_hub.constants

    with FakeHub() as server:
        # huggingface_hub's user-agent telemetry fetches a registry from the endpoint it saw at
        # import time (huggingface.co): off, so nothing leaves this machine.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("RARGEN_MIRROR", server.url)
        for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE"):
            monkeypatch.delenv(name, raising=False)
        yield server


def official_bin(name: str) -> bytes:
    """The official state dict of a tests/data reference file, as the bytes of a torch.save .bin."""
    state = {
        k[6:]: v.float() for k, v in load_file(DATA / f"{name}.safetensors").items() if k.startswith("state.")
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def paired_generator_bin(num_classes: int = 3) -> bytes:
    """A random RAR in the official layout whose 64 tokens and 64 codes fit official_vqgan_small."""
    config = ModelConfig(
        codebook_size=64,
        num_classes=num_classes,
        num_image_tokens=64,
        dim=32,
        depth=1,
        num_heads=2,
        mlp_dim=64,
    )
    torch.manual_seed(0)
    model = RAR(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    buffer = io.BytesIO()
    torch.save(to_official(model), buffer)
    return buffer.getvalue()
