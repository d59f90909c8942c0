"""Shared by the serve tests: a tiny saved generator + tokenizer, a server in a thread, an SSE reader."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rargen.checkpoint import save
from rargen.model import RAR, ModelConfig
from rargen.serve.engine import ServeConfig
from rargen.serve.server import Server, make_server
from rargen.tokenizers.vq import VQTokenizer, VQTokenizerConfig

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def randomize(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def save_tiny_pair(
    root: Path, model_preset: str = "rar-tiny", tokenizer_preset: str = "vq-tiny"
) -> tuple[Path, Path]:
    """A random-weight generator and a matching random tokenizer, saved as checkpoint folders."""
    torch.manual_seed(0)
    tokenizer = VQTokenizer(VQTokenizerConfig.from_name(tokenizer_preset))
    model = randomize(RAR(ModelConfig.from_name(model_preset, dropout=0.0, attn_dropout=0.0)), 0, 0.3)
    assert model.config.codebook_size == tokenizer.codebook_size
    save(model, root / "generator", extra={"class_names": CLASS_NAMES[: model.config.num_classes]})
    save(tokenizer, root / "tokenizer")
    return root / "generator", root / "tokenizer"


@contextmanager
def running_server(pair: tuple[Path, Path], **overrides) -> Iterator[Server]:
    """Serve on 127.0.0.1, an ephemeral port, in a daemon thread."""
    config = ServeConfig(**{"host": "127.0.0.1", "port": 0, **overrides})
    server = make_server(*pair, config, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def request(server: Server, method: str, path: str, body=None, raw: bytes | None = None, headers=None):
    """(status, parsed JSON or text, headers)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        kind = response.getheader("Content-Type", "")
        parsed = json.loads(payload) if kind.startswith("application/json") else payload.decode()
        return response.status, parsed, dict(response.getheaders())
    finally:
        conn.close()


def open_stream(server: Server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(
        "POST", "/generate/stream", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    return conn, conn.getresponse()


def events(response: http.client.HTTPResponse) -> Iterator[tuple[str, dict]]:
    """Parse ``event:``/``data:`` blocks until the server closes the stream."""
    event, data = "message", ""
    while line := response.readline():
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif not line and data:
            yield event, json.loads(data)
            event, data = "message", ""


def wait_for(condition, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
