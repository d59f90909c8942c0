"""`rargen serve` under bad input and bad clients, against a real server on 127.0.0.1 (and ::1):
every request gets an HTTP answer, and the server keeps serving. Bounded in count and time."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import pytest

import rargen.serve.server as serve_module
from conftest import requires
from rargen.serve.engine import ServeConfig
from rargen.serve.server import Handler, Server, make_server
from serve_helpers import events, open_stream, request, running_server, save_tiny_pair, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("serve-reliability"))


def raw_exchange(
    address, data: bytes, *, half_close: bool = False, timeout: float = 30.0
) -> tuple[int, dict]:
    """Send raw bytes, read the answer until the server closes; (final status, JSON body or {})."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(address[:2])
        client.sendall(data)
        if half_close:
            client.shutdown(socket.SHUT_WR)  # `nc -N`: done sending, still reading
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    while answer.startswith(b"HTTP/1.1 100"):  # interim responses (client_gone's probe)
        answer = answer.split(b"\r\n\r\n", 1)[1]
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else {}


def post(body: bytes, path: str = "/generate", extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


BAD_BODIES = [
    # (body, expected status, the field the answer must name or None)
    ('{"class": "\u00b2"}', 422, "class"),  # a Unicode digit: str.isdigit() is true, int() raises
    ('{"class": "\u0663"}', 422, "class"),  # Arabic-Indic three: int() would read it as 3
    ('{"class": "' + "7" * 5000 + '"}', 422, "class"),
    ('{"class": 1, "seed": ' + "9" * 5000 + "}", 400, None),  # beyond Python's 4300-digit int limit
    ('{"class": 1, "seed": ' + "9" * 4000 + "}", 422, "seed"),
    ('{"class": 1, "temperature": ' + "1" * 400 + "}", 422, "temperature"),  # float() would overflow
    ('{"class": 1, "temperature": NaN}', 422, "temperature"),
    ('{"class": 1, "cfg_scale": Infinity}', 422, "cfg_scale"),
    ('{"class": 1, "top_p": -1e-300}', 422, "top_p"),
    ("[" * 30_000 + "]" * 30_000, 400, None),  # nested 30,000 levels
    ('{"a": ' * 6_000 + "1" + "}" * 6_000, 400, None),
    ("[1, 2]", 422, None),
    ('"class"', 422, None),
    (b"\xff\xfe{", 400, None),  # not UTF-8
    ('{"class": 1, "class": "two", "batch_size": 1e3}', 422, "batch_size"),
]


def test_every_bad_body_gets_an_answer_naming_the_field(pair) -> None:
    with running_server(pair, rate_limit=0) as server:
        for body, status, field in BAD_BODIES:
            data = body if isinstance(body, bytes) else body.encode()
            got, answer = raw_exchange(server.server_address, post(data))
            assert (got, answer.get("field")) == (status, field), (body[:60], answer)
            assert answer["error"] and len(answer["error"]) < 400
        assert request(server, "GET", "/health")[0] == 200


def test_an_unforeseen_error_is_a_500_and_the_server_keeps_serving(pair, monkeypatch) -> None:
    def broken(self, body):
        raise KeyError("a bug")

    with running_server(pair, rate_limit=0) as server:
        monkeypatch.setattr(serve_module.Engine, "parse", broken)
        status, answer = raw_exchange(server.server_address, post(b'{"class": 1}'))
        assert status == 500 and "internal error (KeyError)" in answer["error"]
        monkeypatch.undo()
        assert request(server, "POST", "/generate", {"class": 1, "seed": 1})[0] == 200
        # The standard library's own refusals are answered as JSON as well.
        status, answer = raw_exchange(server.server_address, b"NONSENSE\r\n\r\n")
        assert status == 400 and answer["error"]


def _pixels(answer: dict) -> list:
    import base64
    import io

    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png"])))).tolist() for i in answer["images"]]


def test_tiny_temperature_and_top_p_give_the_argmax_images(pair) -> None:
    """They used to return blank images with status 200 (NaN probabilities)."""
    with running_server(pair, rate_limit=0) as server:
        _, greedy, _ = request(
            server, "POST", "/generate", {"class": 3, "seed": 4, "top_k": 1, "batch_size": 2}
        )
        for settings in ({"temperature": 1e-39}, {"temperature": 5e-324}, {"top_p": 1e-45}):
            for seed in (4, 9):  # the argmax does not depend on the noise
                body = {"class": 3, "seed": seed, "batch_size": 2, **settings}
                status, answer, _ = request(server, "POST", "/generate", body)
                assert status == 200 and _pixels(answer) == _pixels(greedy), settings


def test_a_half_closed_client_still_gets_its_answer(pair) -> None:
    with running_server(pair, rate_limit=0) as server:
        for path in ("/generate", "/generate/stream"):
            status, answer = raw_exchange(
                server.server_address, post(b'{"class": 2, "seed": 5}', path), half_close=True
            )
            assert status == 200, path
        # A client that closes fully still cancels (tests/test_serve.py), and nothing is left running.
        assert wait_for(lambda: request(server, "GET", "/health")[1]["active_jobs"] == 0)
        assert request(server, "GET", "/health")[1]["completed"] == 2


def test_connections_are_capped_and_slow_clients_get_a_deadline(pair, monkeypatch) -> None:
    monkeypatch.setattr(Server, "max_connections", 4)
    monkeypatch.setattr(Handler, "request_deadline", 1.5)
    with running_server(pair, rate_limit=0) as server:
        idle = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(4)]
        try:
            assert wait_for(lambda: server._slots._value == 0)
            began = time.monotonic()
            status, answer = raw_exchange(server.server_address, b"GET /health HTTP/1.0\r\n\r\n")
            assert status == 503 and "4 open connections" in answer["error"]
            assert time.monotonic() - began < 1.0  # refused at once, without a thread
            # The idle ones are answered 408 at their deadline and closed; their slots free.
            for client in idle:
                data = client.recv(4096)
                assert data.startswith(b"HTTP/1.0 408"), data[:40]
        finally:
            for client in idle:
                client.close()
        assert wait_for(lambda: server._slots._value == 4)
        # A slow client (a byte every 0.3 s: each read is fast, the request never completes in time).
        with socket.create_connection(server.server_address[:2], timeout=10) as slow:
            began = time.monotonic()
            try:
                for byte in b"GET /health HTTP/1.0\r\nX-Slow: " + b"a" * 100:
                    slow.sendall(bytes([byte]))
                    time.sleep(0.3)
            except OSError:
                pass  # the server closed it
            assert slow.recv(4096).startswith(b"HTTP/1.0 408")
            assert time.monotonic() - began < 5
        assert request(server, "GET", "/health")[0] == 200


def test_one_client_cannot_hold_every_connection(pair) -> None:
    """Issue 25 item 8: 64 slow clients from one address held every slot, and everyone (``/health``
    too) got 503 for 30 s. Connections are capped per address; another address is still served."""
    with running_server(pair, rate_limit=0, max_connections_per_client=3) as server:
        address = server.server_address[:2]
        idle = [socket.create_connection(address, timeout=10) for _ in range(3)]
        try:
            assert wait_for(lambda: server._clients.get("127.0.0.1") == 3)
            status, answer = raw_exchange(address, b"GET /health HTTP/1.0\r\n\r\n")
            assert status == 503 and "--max-connections-per-client" in answer["error"]
            with socket.socket() as other:  # 127.0.0.2 is loopback too: another client address
                other.bind(("127.0.0.2", 0))
                other.settimeout(30)
                other.connect(address)
                other.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                assert other.recv(4096).startswith(b"HTTP/1.0 200")
        finally:
            for client in idle:
                client.close()
        assert wait_for(lambda: "127.0.0.1" not in server._clients)
        assert request(server, "GET", "/health")[0] == 200


@pytest.mark.parametrize(
    "headers, allowed, status",
    [
        ("Host: evil.example\r\n", "", 403),  # DNS rebinding: a page's own name resolving to 127.0.0.1
        ("Host: localhost:8000\r\n", "", 200),
        ("Host: [::1]:8000\r\n", "", 200),
        ("Host: 127.0.0.1:8000\r\nOrigin: http://evil.example\r\n", "", 403),  # a cross-site POST
        ("Host: 127.0.0.1:8000\r\nOrigin: null\r\n", "", 403),
        ("Host: 127.0.0.1:8000\r\nOrigin: http://127.0.0.1:8000\r\n", "", 200),  # the page itself
        ("Host: gpu-box.lan\r\nOrigin: http://gpu-box.lan:8000\r\n", "gpu-box.lan", 200),
        ("Host: gpu-box.lan\r\n", "*", 200),
        ("", "", 200),  # no Host: an HTTP/1.0 client, not a browser
    ],
)
def test_requests_from_other_sites_are_refused(pair, headers: str, allowed: str, status: int) -> None:
    """Issue 25 item 8: no Host or Origin check on a server meant for loopback."""
    with running_server(pair, rate_limit=0, allowed_hosts=allowed) as server:
        body = b'{"class": 1, "seed": 3}'
        data = f"POST /generate HTTP/1.0\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
        got, answer = raw_exchange(server.server_address, data)
        assert got == status, answer
        if status == 403:
            assert "--allowed-hosts" in answer["error"]


def test_a_burst_of_parallel_requests_is_served(pair) -> None:
    with running_server(pair, rate_limit=0) as server:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        statuses: list[int] = []

        def health() -> None:
            statuses.append(request(server, "GET", "/health")[0])

        threads = [threading.Thread(target=health) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert statuses == [200] * 50


@requires(None if socket.has_ipv6 else "IPv6 in this Python", "build Python with IPv6")
@pytest.mark.parametrize("host", ["::1", "::"])
def test_ipv6_hosts(pair, host: str) -> None:
    with running_server(pair, host=host, rate_limit=0) as server:
        assert server.address_family == socket.AF_INET6 and server.url.startswith("http://[")
        status, answer = raw_exchange(("::1", server.server_address[1]), b"GET /health HTTP/1.0\r\n\r\n")
        assert status == 200 and answer["status"] == "ok"
        if host == "::":  # dual stack: IPv4 clients too
            status, _ = raw_exchange(("127.0.0.1", server.server_address[1]), b"GET /health HTTP/1.0\r\n\r\n")
            assert status == 200


def test_a_port_in_use_or_out_of_range_is_one_clear_line(pair, capsys) -> None:
    from rargen.cli.main import main

    with running_server(pair) as server:
        port = server.server_address[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1 port {port}: the port is in use"):
            make_server(*pair, ServeConfig(port=port), quiet=True)
        assert main(["serve", str(pair[0]), "--tokenizer", str(pair[1]), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the port is in use" in err and "--port" in err
    with pytest.raises(ValueError, match=r"port must be in \[0, 65535\]"):
        ServeConfig(port=70000)


def _mutations(rng: random.Random, valid: bytes) -> bytes:
    """One random or mutated request body."""
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    data = bytearray(valid)
    if kind == 1:  # flip bytes
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 2:  # insert JSON punctuation or digits
        for _ in range(rng.randrange(1, 6)):
            data.insert(rng.randrange(len(data) + 1), rng.choice(b'{}[]",:0123456789e-.'))
    elif kind == 3:  # truncate (the Content-Length still matches what is sent)
        data = data[: rng.randrange(len(data))]
    elif kind == 4:  # a field with a value of another type
        field = rng.choice(["class", "seed", "cfg_scale", "temperature", "top_k", "top_p", "batch_size"])
        value = rng.choice(['"x"', "null", "[]", "{}", "true", "-1", "1e400", "9" * 30, '"\u00b2"', "0.5"])
        data = f'{{"class": 1, "{field}": {value}}}'.encode()
    else:  # deep nesting of random width
        depth = rng.randrange(1, 3000)
        data = bytearray(b"[" * depth + b"]" * rng.randrange(depth + 1))
    return bytes(data)


def test_fuzzed_bodies_all_get_an_answer(pair, monkeypatch) -> None:
    """160 random and mutated bodies: each gets a well-formed HTTP answer (never a dropped
    connection, never a 500) and the server keeps serving."""
    monkeypatch.setattr(Handler, "request_deadline", 5.0)
    rng = random.Random(18)
    valid = b'{"class": 1, "seed": 7, "cfg_scale": 2.0, "temperature": 0.9, "top_k": 5, "top_p": 0.9}'
    seen: dict[int, int] = {}
    with running_server(pair, rate_limit=0) as server:
        for _ in range(160):
            body = _mutations(rng, valid)
            path = rng.choice(["/generate", "/generate/stream"])
            status, answer = raw_exchange(server.server_address, post(body, path), timeout=20)
            seen[status] = seen.get(status, 0) + 1
            assert status in (200, 400, 422), (status, body[:80], answer)
            if status != 200:
                assert answer["error"]
        assert request(server, "GET", "/health")[0] == 200
    assert seen.get(400, 0) > 10 and seen.get(422, 0) > 10  # the fuzzing reached both checks


# ---------------------------------------------------------------------------------------------
# Load: many users with the same settings, some pressing Stop (issue 25, items 1 and 2)


def _load_request(server, body: dict, cancel: tuple[str, int] | None) -> list | None:
    """One user: the final PNGs, or None when the user hung up (``cancel``: ("stream", after this
    many progress events) or ("plain", after this many milliseconds))."""
    if cancel is None:
        status, answer, _ = request(server, "POST", "/generate", body)
        assert status == 200, answer
        return _pixels(answer)
    how, when = cancel
    if how == "plain":
        with socket.create_connection(server.server_address[:2], timeout=30) as client:
            client.sendall(post(json.dumps(body).encode()))
            time.sleep(when / 1000)
        return None
    conn, response = open_stream(server, {**body, "stream_every": 1})
    try:
        seen = 0
        for name, _ in events(response):
            if name == "progress":
                seen += 1
            if seen >= when or name in ("done", "error"):
                return None
        return None
    finally:
        conn.close()


def test_64_users_with_equal_settings_some_cancelling_all_get_their_images(pair, monkeypatch) -> None:
    """64 concurrent requests with identical settings, a third cancelled at random points, batch
    sizes that overflow the 16 shared rows together (4 + 8 + 8 ...): every request that was not
    cancelled gets exactly the images it gets alone, and the server serves on with /health 200.
    On a4f2558 the decoding thread died (equal jobs compared by their noise tensors, batches
    overflowed at admission) and every request hung."""
    from rargen.sampling.decoding import DecodeBatch

    original, window = DecodeBatch.step, DecodeBatch.feed_windows

    def slower(self, *args):  # a few ms per step or pass, so that users overlap and cancel mid-decode
        time.sleep(0.003)
        return (window if args else original)(self, *args)

    monkeypatch.setattr(DecodeBatch, "step", slower)
    monkeypatch.setattr(DecodeBatch, "feed_windows", slower)
    rng = random.Random(25)
    sizes = [rng.choice([1, 4, 8]) for _ in range(64)]
    cancels = [None] * 64
    for i in rng.sample(range(64), 21):
        stream = rng.random() < 0.5
        cancels[i] = ("stream", rng.randrange(0, 4)) if stream else ("plain", rng.randrange(5, 200))
    body = {"class": 3, "seed": 11}
    results: list = [None] * 64
    errors: list = []
    # 64 users, all on 127.0.0.1 here: the per-address connection cap would take them for one client.
    settings = {"rate_limit": 0, "max_connections_per_client": 0}
    with running_server(pair, max_batch_size=8, max_rows=16, max_queue=64, **settings) as server:

        def user(i: int) -> None:
            try:
                results[i] = _load_request(server, {**body, "batch_size": sizes[i]}, cancels[i])
            except Exception as error:  # noqa: BLE001 - reported by the main thread
                errors.append((i, repr(error)))

        threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(64)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), "requests hung"
        assert errors == []
        assert wait_for(lambda: request(server, "GET", "/health")[1]["active_jobs"] == 0, timeout=10)
        status, health, _ = request(server, "GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["failed"] == 0
        # A user who hung up after the last step may still count as completed.
        assert health["completed"] + health["cancelled"] == 64 and health["completed"] >= 64 - 21
        assert health["cancelled"] > 0
        monkeypatch.setattr(DecodeBatch, "step", original)
        monkeypatch.setattr(DecodeBatch, "feed_windows", window)
        alone = {size: _load_request(server, {**body, "batch_size": size}, None) for size in set(sizes)}
        assert request(server, "GET", "/health")[0] == 200
    for i in range(64):
        if cancels[i] is None:
            assert results[i] == alone[sizes[i]], f"request {i} (batch {sizes[i]})"


def test_health_is_503_when_the_decoding_loop_is_dead(pair) -> None:
    """/health said ok while every generation hung; now it reports the dead loop."""
    with running_server(pair, rate_limit=0) as server:
        server.engine.scheduler.stop()
        status, answer, _ = request(server, "GET", "/health")
        assert status == 503 and answer["status"] == "unhealthy"
        assert answer["scheduler"] == "the decoding thread is not running"
