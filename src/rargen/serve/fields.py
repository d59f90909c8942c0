"""The fields of a server request, read and refused: ``RequestError`` (an HTTP status and the
field it names), numbers and integers within bounds, and the edit fields: ``image``, a base64 PNG of
the server's image size, and ``mask``, the token cells to regenerate (a list of cell indices in
raster order, or a 2D 0/1 list at the token grid); the edit readers raise a ValueError that the
engine answers as a 422 naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import torch
from torch import Tensor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RequestError(ValueError):
    """A rejected request: HTTP ``status`` with a message naming the bad ``field``."""

    def __init__(self, message: str, field: str | None = None, status: int = 422, retry_after: int = 0):
        super().__init__(message)
        self.field, self.status, self.retry_after = field, status, retry_after


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, shortened: an error message never echoes a 5000-digit number whole."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        return "an integer too large to show"
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} characters)"


def number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {shown(value)}", name)
    # Compare before converting: float() of a 400-digit JSON integer overflows.
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {shown(value)}", name)
    if not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{name} must be in {interval}, got {shown(value)}", name)
    return float(value)


def integer(body: dict, name: str, default: int, low: int, high: int, hint: str = "") -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {shown(value)}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be in [{low}, {high}]{hint}, got {shown(value)}", name)
    return value


def edit_body_allowance(height: int, width: int) -> int:
    """Bytes an edit request may add to the body limit: the base64 text of an RGB PNG of the
    image size stored without compression (a photo PNG compresses little), plus 4 KiB of chunks."""
    return math.ceil(4 / 3 * (height * (3 * width + 1) + 4096))


def read_png(value: object, size: tuple[int, int]) -> Tensor:
    """A base64 PNG (a ``data:image/png;base64,`` prefix allowed) of ``size`` (H, W) -> (3, H, W)
    float in [0, 1]."""
    from PIL import Image

    if not isinstance(value, str):
        raise ValueError(f"image must be a base64 PNG string, got a {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64; send the PNG file's bytes base64-encoded") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("image is not a PNG (no PNG signature); send a PNG file base64-encoded")
    (H, W), refusal = size, None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as picture:
            if picture.size != (W, H):  # read from the header: a huge image is never decoded
                refusal = (
                    f"image is {picture.width}x{picture.height} pixels; this server edits {W}x{H} "
                    "images: crop or resize it first (the page does)"
                )
            else:
                picture = picture.convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a damaged file
        raise ValueError(
            f"image is not a readable PNG ({type(error).__name__}); send a whole PNG file"
        ) from None
    if refusal is not None:
        raise ValueError(refusal)
    return (
        torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(H, W, 3).permute(2, 0, 1) / 255
    )


def read_mask(value: object, grid: tuple[int, int]) -> Tensor:
    """The cells to regenerate (h * w,) bool in raster order, from a list of cell indices or an
    ``h`` x ``w`` list of 0/1 rows."""
    h, w = grid
    forms = f"a list of token-cell indices in [0, {h * w - 1}] or {h} rows of {w} 0/1 values (the token grid)"
    if not isinstance(value, list):
        raise ValueError(f"mask must be {forms}, got a {type(value).__name__}")
    mask = torch.zeros(h * w, dtype=torch.bool)
    if value and all(isinstance(row, list) for row in value):
        if len(value) != h or any(len(row) != w for row in value):
            shape = f"{len(value)} rows of {sorted({len(row) for row in value})} values"
            raise ValueError(f"mask must be {h} rows of {w} 0/1 values (the token grid), got {shape}")
        cells = [cell for row in value for cell in row]
        if any(type(cell) not in (int, bool) or cell not in (0, 1) for cell in cells):
            raise ValueError("mask rows must hold 0 (keep) or 1 (regenerate) only")
        mask[:] = torch.tensor(cells, dtype=torch.bool)
    else:
        bad = [cell for cell in value if type(cell) is not int or not 0 <= cell < h * w]
        if bad:
            raise ValueError(f"mask must be {forms}; {str(bad[0])[:20]} is not")
        mask[value] = True
    if not mask.any():
        raise ValueError("mask has no cells to regenerate; mark at least one token cell")
    return mask


__all__ = ["RequestError", "edit_body_allowance", "integer", "number", "read_mask", "read_png", "shown"]
