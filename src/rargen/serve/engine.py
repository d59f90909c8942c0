"""The generation engine behind ``rargen serve``: request validation, admission (rate limit,
queue), the shared continuously batched decoding (``rargen.serve.batching``) and the PNGs with their
settings. ``rargen.serve.server`` is the HTTP layer over it.

A request's sampling settings are ``SampleConfig``'s fields: the server bounds each to what any
sampling needs (a 5000-digit number is a 422, not a hang) and ``SampleConfig`` checks the rest;
either refusal is a ``RequestError`` (422) naming the field.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import queue
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from rargen.data.folders import class_name_key
from rargen.model import RAR
from rargen.sampling.any_order import known_first
from rargen.sampling.decoding import prepare_for_decoding
from rargen.sampling.engine import SampleConfig, draw_noise, sample_seed
from rargen.sampling.images import to_uint8
from rargen.serve.batching import BatchScheduler, Job, QueueFull, retry_after
from rargen.serve.fields import RequestError, edit_body_allowance, integer, number, read_mask, read_png, shown
from rargen.tokenizers.base import as_data_images, check_pair, codes_from_sequence, image_channels

MAX_BODY_BYTES = 64 * 1024  # an edit request's may be larger by its image: Engine.max_body_bytes
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
    speculate: int = 8  # draft tokens per exact speculative pass, run while measured faster; 0 = off
    max_connections_per_client: int = 32  # open connections one client address may hold; 0 = no cap
    allowed_hosts: str = ""  # names served besides IPs and localhost, comma-separated; "*" = any
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
        for name in (
            "port",
            "rate_limit",
            "stream_every",
            "max_queue",
            "max_connections_per_client",
            "speculate",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"ServeConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.port > 65535:
            raise ValueError(f"ServeConfig.port must be in [0, 65535] (0 = any free port), got {self.port}")


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, eq=False)  # eq=False: holds tensors (compare by identity)
class GenerationRequest:
    """Validated settings of one generation request (what the PNGs record)."""

    class_id: int
    class_name: str | None
    sample_config: SampleConfig
    seed: int
    batch_size: int
    stream_every: int  # how it was shown, not what was sampled: not in the settings
    order: str = "raster"  # of the drawn cells: "raster" (among them) or "random"
    codes: Tensor | None = None  # (1, L) the edited image's codes (an edit), else None
    mask: Tensor | None = None  # (L,) bool: the cells an edit regenerates

    def settings(self) -> dict[str, Any]:
        edit = {} if self.mask is None else {"mask": self.mask.nonzero()[:, 0].tolist()}
        return {
            "class_id": self.class_id, "class_name": self.class_name, **asdict(self.sample_config),
            "seed": self.seed, "batch_size": self.batch_size,
            **({"order": self.order} if self.order != "raster" or edit else {}), **edit,
        }  # fmt: skip


# The server's bounds of the sampling settings, (low, high, low excluded): beyond them a request is
# refused before SampleConfig sees it (and a 400-digit number never reaches float()). ``top_k``
# is bounded by the codebook. A SampleConfig field without bounds is checked by SampleConfig alone.
SAMPLE_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "cfg_scale": (0.0, 100.0, False),
    "cfg_power": (0.0, 10.0, False),
    "temperature": (0.0, 10.0, True),
    "top_p": (0.0, 1.0, True),
}


# ---------------------------------------------------------------------------------------------
# The engine: validation, admission, the shared decoding batch, PNGs


class Engine:
    """Generates for the HTTP layer: validates settings, admits requests, and decodes them all in
    one continuously batched ``rargen.serve.batching.BatchScheduler`` (``start``/``stop`` its thread)."""

    def __init__(
        self, model: RAR, tokenizer: torch.nn.Module, config: ServeConfig, checkpoint: dict | None = None
    ):
        check_pair(model, tokenizer)
        cfg = model.config
        # What the tokenizer decodes: a (B, h, w) grid (2D tokenizers; painted row by row while
        # sampling) or a (B, K) sequence (TiTok's 1D tokens: no rows to paint, so progress is a
        # token count and the images come when the sequence is complete).
        probe = torch.zeros(1, cfg.num_image_tokens, dtype=torch.int64)
        probe_codes = codes_from_sequence(tokenizer, probe, cfg.grid)
        self.model, self.tokenizer, self.config = model.eval(), tokenizer.eval(), config
        # (token rows, tokens per row): (h, w) for a grid, (K, 1) for a 1D sequence (a "row" is a token)
        self.progressive = probe_codes.ndim == 3
        self.grid = tuple(probe_codes.shape[1:]) if self.progressive else (cfg.num_image_tokens, 1)
        names = getattr(model, "checkpoint_extra", {}).get("class_names")
        if names is not None and len(names) != cfg.num_classes:
            raise ValueError(f"the checkpoint has {len(names)} class names for {cfg.num_classes} classes")
        self.class_names: list[str] | None = [str(n) for n in names] if names is not None else None
        self.checkpoint = checkpoint or {}
        self.channels = image_channels(tokenizer)  # 1: grey data, grey PNGs (as rargen sample)
        with torch.inference_mode():
            probe = self.tokenizer.decode(probe_codes.to(config.device))
        self.image_size = (int(probe.shape[-2]), int(probe.shape[-1]))
        self.max_body_bytes = MAX_BODY_BYTES + (
            edit_body_allowance(*self.image_size) if self.progressive else 0
        )
        # Prepared for decoding once (packed for oneDNN on CPUs), not per request.
        decoder = prepare_for_decoding(self.model)
        self.scheduler = BatchScheduler(decoder, config.max_rows, config.max_queue, config.speculate)
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
                "max_body_bytes": MAX_BODY_BYTES,
                "max_edit_body_bytes": self.max_body_bytes,
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
        order = body.get("order", "raster")
        if order not in ("raster", "random"):
            raise RequestError(f"order must be 'raster' or 'random', got {shown(order)}", "order")
        return GenerationRequest(
            class_id=class_id,
            class_name=class_name,
            sample_config=self._sample_config(body),
            seed=integer(body, "seed", secrets.randbelow(2**31), 0, MAX_SEED),
            batch_size=integer(
                body, "batch_size", 1, 1, self.config.max_batch_size, " (the server's --max-batch-size)"
            ),
            stream_every=integer(
                body, "stream_every", self.default_stream_every, 1, self.grid[0], " token rows"
            ),
            order=order,
            **self._edit(body),
        )

    def _edit(self, body: dict) -> dict[str, Tensor]:
        """An edit's ``codes`` (the image encoded) and ``mask`` (``rargen.serve.edits``); none without."""
        if "image" not in body and "mask" not in body:
            return {}
        for name in ("image", "mask"):
            if name not in body:
                raise RequestError(f"an edit needs image and mask; {name} is missing", name)
        if not self.progressive:
            refusal = "this server's tokenizer makes 1D tokens with no image positions: it cannot edit"
            raise RequestError(refusal, "image")
        for name, read, shape in (("image", read_png, self.image_size), ("mask", read_mask, self.grid)):
            try:
                value = read(body[name], shape)
            except ValueError as error:
                raise RequestError(str(error), name) from None
            if name == "image":
                with torch.inference_mode():
                    codes = self.tokenizer.encode(value[None].to(self.config.device)).flatten(1)
        return {"codes": codes, "mask": value.to(codes.device)}

    def _sample_config(self, body: dict) -> SampleConfig:
        """The request's ``SampleConfig``: each field within the server's bounds, then SampleConfig's
        own checks (its ValueError names the field: ``SampleConfig.top_p must ...``)."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(SampleConfig):
            name, default = field.name, field.default
            if name == "top_k":
                values[name] = integer(body, name, default, 0, self.model.config.codebook_size, " (0 = off)")
            elif field.type in ("int", "float"):
                low, high, low_open = SAMPLE_BOUNDS.get(name, (-math.inf, math.inf, False))
                check = integer if field.type == "int" else number
                values[name] = check(
                    body, name, default, low, high, **({"low_open": low_open} if low_open else {})
                )
            else:
                values[name] = body.get(name, default)
        try:
            return SampleConfig(**values)
        except ValueError as error:
            found = re.match(r"SampleConfig\.(\w+) ", str(error))
            raise RequestError(str(error).removeprefix("SampleConfig."), found and found.group(1)) from None

    def _class(self, body: dict) -> tuple[int, str | None]:
        if "class" not in body:
            raise RequestError(
                "class is required: a class id or, when the checkpoint has names, a name", "class"
            )
        value, C = body["class"], self.model.config.num_classes
        if isinstance(value, str) and self.class_names is not None and value in self.class_names:
            return self._class_by_name(value)  # a name first: "007" may be a class, not id 7
        # ASCII digits only: str.isdigit() is also true of '²' and '٣', which int() refuses or reads.
        if isinstance(value, str) and not re.fullmatch(r"[0-9]+", value.strip()):
            if self.class_names is None:
                raise RequestError(
                    f"class {shown(value)} is a name but this checkpoint has no class names; "
                    f"pass an id in [0, {C - 1}]",
                    "class",
                )
            return self._class_by_name(value)
        if isinstance(value, str):
            digits = value.strip().lstrip("0") or "0"
            if len(digits) > 18:  # no class id is that long; int() of 5000 digits would raise
                raise RequestError(f"class must be in [0, {C - 1}], got {shown(value)}", "class")
            value = int(digits)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"class must be an integer id or a name, got {shown(value)}", "class")
        if not 0 <= value < C:
            raise RequestError(f"class must be in [0, {C - 1}], got {shown(value)}", "class")
        return value, self.class_names[value] if self.class_names else None

    def _class_by_name(self, value: str) -> tuple[int, str]:
        """The class named exactly ``value``, else the one name equal to it ignoring case and spaces
        (``rargen.data.folders.class_name_key``); names that differ only in case are never guessed
        between (``cat`` was served as class 0 ``Cat`` when the lookup lower-cased)."""
        names = self.class_names or []
        matches = [i for i, name in enumerate(names) if name == value]
        if not matches:
            key = class_name_key(value)
            matches = [i for i, name in enumerate(names) if class_name_key(name) == key]
        if len(matches) == 1:
            return matches[0], names[matches[0]]
        if not matches:
            raise RequestError(f"class {shown(value)} is not one of this checkpoint's class names", "class")
        listed = ", ".join(f"{shown(names[i])} ({i})" for i in matches[:10])
        raise RequestError(
            f"class {shown(value)} matches {len(matches)} class names that differ only in case or spaces: "
            f"{listed}; pass the exact name or the id",
            "class",
        )

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
        B, device = request.batch_size, self.model.device
        with torch.inference_mode():
            noise = draw_noise((B, cfg.num_image_tokens, cfg.codebook_size), device, seeds=seeds)
        known = None if request.codes is None else request.codes.expand(B, -1)
        known_mask = None if request.mask is None else ~request.mask.expand(B, -1)
        # As generate(known=..., order=...) orders each row: its known cells first (None: raster).
        plan = known_first(known, known_mask, request.order, B, cfg, device, seeds)
        return Job(
            labels=[request.class_id] * B,
            config=request.sample_config,
            noise=noise,
            width=self.grid[1],
            stream_every=request.stream_every,
            **({} if plan is None else {"orders": plan.orders, "known": plan.tokens, "counts": plan.counts}),
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

    def images(self, tokens: Tensor, rows_done: int | None = None, filled: Tensor | None = None) -> Tensor:
        """Decode tokens (B, L) to uint8 images (B, H, W, 3); rows from ``rows_done`` on are grey,
        or (a job in another order) the cells not ``filled`` (B, L) bool.

        A 1D tokenizer has no rows to paint: a partial sequence gives no images (B, 0, 0, 3)."""
        h, w = self.grid
        partial = rows_done is not None and rows_done < h
        if partial and not self.progressive:
            return torch.zeros(tokens.shape[0], 0, 0, 3, dtype=torch.uint8)
        codes = codes_from_sequence(self.tokenizer, tokens, self.model.config.grid).clone()
        if filled is not None:
            codes = codes.where(filled.view(-1, h, w), 0)
        elif partial:
            # Repeat the last finished row below it: a guess the decoder blends less harshly than 0s.
            codes[:, rows_done:] = codes[:, max(rows_done - 1, 0)][:, None] if rows_done else 0
        with torch.inference_mode():
            images = as_data_images(self.tokenizer.decode(codes).float().clamp(0, 1), self.channels)
            H, W = images.shape[2:]
            if filled is not None:  # each cell's pixels: grey until it is drawn
                cells = filled.view(-1, 1, h, 1, w, 1).expand(-1, 1, h, H // h, w, W // w)
                images = images.where(cells.reshape(-1, 1, H, W), GREY)
            elif partial:
                images[:, :, rows_done * H // h :] = GREY
        return torch.from_numpy(to_uint8(images))

    def pngs(
        self,
        tokens: Tensor,
        request: GenerationRequest | None = None,
        rows_done: int | None = None,
        filled: Tensor | None = None,
    ):
        """Base64 PNGs of a batch; final ones (with ``request``) carry their settings."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        out = []
        images = self.images(tokens, rows_done, filled)
        if images.shape[1] == 0:  # a partial 1D sequence: nothing to show yet
            return []
        for index, pixels in enumerate(images):
            buffer, info = io.BytesIO(), None
            if request is not None:
                info = PngInfo()
                for key, value in self.png_text(request, index).items():
                    info.add_text(key, value)
            picture = Image.fromarray(pixels.numpy())
            (picture.convert("L") if self.channels == 1 else picture).save(buffer, format="PNG", pnginfo=info)
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
        name = (
            f"c{request.class_id}"
            + (f"-{name}" if name else "")
            + ("_edit" if request.mask is not None else "")
        )
        sample = request.sample_config
        return (
            f"rargen_{name}_seed{request.seed}_{index}_cfg{sample.cfg_scale:g}_pow{sample.cfg_power:g}"
            f"_t{sample.temperature:g}_k{sample.top_k}_p{sample.top_p:g}.png"
        )


_FIELDS = {
    "class", *(f.name for f in dataclasses.fields(SampleConfig)), "seed", "batch_size", "stream_every",
    "order", "image", "mask",
}  # fmt: skip
