"""Image sources for every command that reads images: the digits, a class-folder tree, an ``.npz``.

What a class of a folder is (and which trees are refused) is ``rargen.data.folders``' one rule.

A source is a random-access list of (PIL image, label) with class names. Unconditional data has no
class names (``num_classes == 0``) and every label is 0, which is then also the generator's null
label (``num_classes``), so a store of unconditional data trains an unconditional model as is.
``read_images`` is the one way to read a source into memory, reporting what it skipped; the one
held-out split of a source is ``rargen.data.split``'s.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rargen.data.folders import check_readable, describe_scan, scan_folder

# Images with more pixels are skipped (and listed in the store's report.json) before they are
# decoded: a 97 KB PNG can declare 10000 x 10000 pixels and take 1 GB to decode. 40 M pixels is
# about 6300 x 6300, beyond any ImageNet photo; raise it with `max_pixels` (`--max-pixels`).
DEFAULT_MAX_PIXELS = 40_000_000
# Single-channel modes with more than 8 bits per pixel; PIL's convert("RGB") clips them to 255.
_HIGH_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image``, scaling high-bit-depth and float greyscale to 8 bits.

    PIL's own ``convert("RGB")`` clips values to [0, 255]: a 16-bit PNG became a white square and
    a float TIFF of values in [0, 1] a black one. Integer images (``I;16``, ``I``) whose values fit
    16 bits map v to round(v / 257) (65535 -> 255). Float images (``F``) are read in the first of
    the ranges [0, 1], [0, 255], [0, 65535] that holds all their values, so an image keeps its
    brightness; values outside all three (and 32-bit integers beyond 16 bits) span their own
    min..max. NaN and infinities take the ends of the finite range.
    """
    if image.mode not in (*_HIGH_BIT_GREY, "F"):
        return image.convert("RGB")
    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError(f"a {image.mode} image with no finite pixel value")
    low, high = float(finite.min()), float(finite.max())
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    ranges = (1.0, 255.0, 65535.0) if image.mode == "F" else (65535.0,)
    full = next((top for top in ranges if low >= 0.0 and high <= top), None)
    offset, scale = (0.0, full) if full is not None else (low, (high - low) or 1.0)
    grey = np.clip(np.round((values - offset) * (255.0 / scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def open_image_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded RGB image of the file ``path``; ValueError for what must be skipped.

    Not a regular file (a FIFO named .png would block the reader for ever, a folder, a device),
    or more than ``max_pixels`` pixels (checked from the header, before decoding), raise a
    ValueError that says so; a corrupt file raises PIL's error.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
        raise ValueError(f"not a regular file ({kind})")
    with warnings.catch_warnings():  # the size is checked below, before any decoding
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(
                    f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                    "(a decompression bomb or a huge image); raise max_pixels (--max-pixels) to keep it"
                )
            return to_rgb(image)  # forces the full decode, so corrupt files raise here


class ImageSource:
    """A random-access image list: ``len``, ``load(i)``, ``label(i)``, ``name(i)``, ``class_names``."""

    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """The RGB image at ``index``; raises (OSError, ValueError, ...) if it cannot be read."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """A human-readable name of item ``index`` (a file path where there is one), for reports."""
        return f"#{index}"

    def describe(self) -> dict[str, Any]:
        """What this source is, for the store's ``meta.json``."""
        raise NotImplementedError

    @property
    def excluded(self) -> tuple[dict[str, str], ...]:
        """``{"path", "reason"}`` of each entry the source left out (a folder's hidden or stray files)."""
        return ()

    def summary(self, what: str) -> str:
        """What a command prints when it opens the source: classes, images, what was left out."""
        shown = ", ".join(self.class_names[:8]) + (", ..." if self.num_classes > 8 else "")
        classes = f"{self.num_classes} classes ({shown})" if self.class_names else "unlabelled"
        return f"{what}: {len(self)} images, {classes}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _uint8_images(array: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W[, C]) uint8 or float in [0, 1] -> (N, H, W, 3) uint8 (floats are rounded)."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: expected images (N, H, W, 3) or (N, H, W), got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{what}: images must be uint8 or float in [0, 1], got dtype {array.dtype}")
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{what}: float images must lie in [0, 1], found [{low:.3g}, {high:.3g}]")
        array = np.round(array * 255.0).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


class ArraySource(ImageSource):
    """Images held in memory: (N, H, W, 3) uint8 (or float in [0, 1]) plus optional labels."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        class_names: tuple[str, ...] | None = None,
        description: dict[str, Any] | None = None,
    ) -> None:
        self.images = _uint8_images(np.asarray(images), "images")
        if labels is None:
            self.labels = np.zeros(len(self.images), dtype=np.int64)
            self.class_names = tuple(class_names or ())
        else:
            self.labels = np.asarray(labels).astype(np.int64).reshape(-1)
            if len(self.labels) != len(self.images):
                raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")
            if self.labels.size and self.labels.min() < 0:
                raise ValueError(f"labels must be >= 0, found {int(self.labels.min())}")
            num_classes = int(self.labels.max()) + 1 if self.labels.size else 0
            default_names = tuple(str(i) for i in range(num_classes))
            self.class_names = tuple(class_names) if class_names else default_names
            if len(self.class_names) < num_classes:
                raise ValueError(f"{len(self.class_names)} class names for labels up to {num_classes - 1}")
        self.description = description or {"type": "array"}

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="RGB")

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self) -> dict[str, Any]:
        return {**self.description, "num_images": len(self)}


def digit_source(split: str = "train", image_size: int = 32) -> ArraySource:
    """The embedded digits (classes "0".."9"), upscaled to ``image_size`` by rargen.data.digits (bicubic)."""
    from rargen.data.digits import DIGIT_CLASS_NAMES, load_digit_images

    images, labels = load_digit_images(split, image_size=image_size)  # (N, 3, S, S) float in [0, 1]
    array = images.permute(0, 2, 3, 1).numpy()
    return ArraySource(
        array,
        labels.numpy(),
        DIGIT_CLASS_NAMES,
        {"type": "digits", "split": split, "image_size": image_size},
    )


def npz_source(path: str | os.PathLike) -> ArraySource:
    """An ``.npz`` with ``arr_0`` (N, H, W, 3) uint8 or float in [0, 1], optional ``labels`` (N,)
    and optional ``class_names`` (strings); without ``labels`` the data is unconditional."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npz file at {str(path)!r}")
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path}: an image .npz needs the images under 'arr_0'; found keys {list(data)}")
        labels = data["labels"] if "labels" in data else None
        names = tuple(str(n) for n in data["class_names"]) if "class_names" in data else None
        return ArraySource(data["arr_0"], labels, names, {"type": "npz", "path": str(path.resolve())})


class FolderSource(ImageSource):
    """``root/<class>/<image>`` (class index = sorted folder order), or ``root/<image>`` unconditional.

    What a class is, and which trees are refused, is ``rargen.data.folders``' rule (``scan``
    holds the result); each class must have a readable image, checked here (one decode per
    class). Files are sorted, so the order (and therefore the store) is reproducible.
    """

    def __init__(self, root: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.root, self.max_pixels = Path(root), max_pixels
        self.scan = scan_folder(self.root)
        check_readable(self.scan, lambda path: open_image_file(path, max_pixels))
        self.class_names = self.scan.class_names
        self.files: list[Path] = [path for files in self.scan.class_files for path in files]
        counts = [len(files) for files in self.scan.class_files]
        self.labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        return open_image_file(self.files[index], self.max_pixels)

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def name(self, index: int) -> str:
        return str(self.files[index].relative_to(self.root))

    def describe(self) -> dict[str, Any]:
        return {"type": "folder", "path": str(self.root.resolve()), "num_images": len(self)}

    @property
    def excluded(self) -> tuple[dict[str, str], ...]:
        return self.scan.excluded

    def summary(self, what: str) -> str:
        return describe_scan(self.scan, what)


def open_source(
    spec: str | os.PathLike, image_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageSource:
    """``"digits"`` (all of them) / ``"digits:train|heldout|all"``, a folder of images, or an ``.npz`` file.

    ``image_size`` only matters for the digits, which are upscaled straight to the target size;
    ``max_pixels`` for a folder (larger images are skipped).
    """
    text = str(spec)
    if text == "digits" or text.startswith("digits:"):
        split = text.partition(":")[2] or "all"  # split by rargen.data.split like any source
        return digit_source(split, image_size=image_size)
    path = Path(text)
    if path.is_dir():
        return FolderSource(path, max_pixels)
    if path.suffix == ".npz":
        return npz_source(path)
    choices = "pass 'digits[:split]', a folder of images or an .npz file"
    if not path.exists():
        raise FileNotFoundError(f"no image source at {text!r}; {choices}")
    raise ValueError(f"cannot read images from {text!r}; {choices}")


def read_images(
    source: ImageSource, image_size: int, indices: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(images (n, S, S, 3) uint8, labels (n,), source indices (n,), skipped) of the readable images.

    Each image is centre-cropped and resized to ``image_size`` as ``pretokenize`` does, so a
    tokenizer is trained on what it will later tokenize. ``skipped`` lists ``{"index", "name",
    "error"}`` for every image that could not be read (corrupt, not a regular file, too large).
    """
    from rargen.data.preprocess import center_crop

    indices = range(len(source)) if indices is None else indices
    images, labels, kept, skipped = [], [], [], []
    for index in indices:
        index = int(index)
        try:
            image = center_crop(source.load(index), image_size)
        except Exception as error:  # noqa: BLE001 - as in pretokenize: a bad file skips the image, never the run
            error_text = f"{type(error).__name__}: {error}"
            skipped.append({"index": index, "name": source.name(index), "error": error_text})
            continue
        images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        labels.append(source.label(index))
        kept.append(index)
    shape = (0, image_size, image_size, 3)
    array = np.stack(images) if images else np.zeros(shape, dtype=np.uint8)
    return array, np.asarray(labels, dtype=np.int64), np.asarray(kept, dtype=np.int64), skipped


def describe_read(
    what: str, num_read: int, skipped: list[dict[str, Any]], limit: int = 10, listed_in: str | None = None
) -> str:
    """A console summary: how many images were read, how many skipped and why (the first ``limit``);
    ``listed_in`` names the file that lists them all, for a command that writes one."""
    lines = [f"{what}: read {num_read} image(s), skipped {len(skipped)}"]
    for item in skipped[:limit]:
        lines.append(f"  skipped {item['name']}: {' '.join(str(item['error']).split())}")
    if len(skipped) > limit:
        where = f" (all listed in {listed_in})" if listed_in else ""
        lines.append(f"  ... and {len(skipped) - limit} more{where}")
    return "\n".join(lines)


def describe_channels(what: str, images: np.ndarray, names: list[str], limit: int = 3) -> str | None:
    """A line for a source that mixes grey and colour images ((n, S, S, 3) uint8 as read), or None.

    Every image is read as RGB (a grey one with its value in all three channels), and data with one
    colour image counts as colour, so a stray grey file (or a stray colour one) in a folder changes
    what the models learn; it used to be taken in silently."""
    grey = ((images[..., 0] == images[..., 1]) & (images[..., 0] == images[..., 2])).all(axis=(1, 2))
    if grey.all() or not grey.any():
        return None
    few, many = (grey, "grey") if grey.sum() <= (~grey).sum() else (~grey, "colour")
    listed = [name for name, odd in zip(names, few, strict=True) if odd]
    shown = ", ".join(listed[:limit]) + (", ..." if len(listed) > limit else "")
    other = "colour" if many == "grey" else "grey"
    return (
        f"{what}: mixed channels: {len(listed)} of {len(images)} images are {many} ({shown}), the other "
        f"{len(images) - len(listed)} {other}; all are used as colour (RGB; a grey image's value in all "
        "three channels) and the data counts as colour. Convert or remove them if that is not intended"
    )


def source_image_size(source: ImageSource) -> int:
    """The shorter side of the first readable image of ``source`` (what it is cropped to)."""
    for index in range(len(source)):
        try:
            width, height = source.load(index).size
        except Exception:  # noqa: BLE001 - unreadable files are reported by read_images
            continue
        return min(width, height)
    raise ValueError("the image source has no readable image to take the size from; pass --image-size")
