"""Issue 27's measured case: a colour folder of 8 classes x 100 photographic 32x32 crops, built
locally (no download), then optionally ``rargen demo --data`` on it at default settings.

The classes are the four quadrants of each of scikit-learn's two sample photos (``china.jpg`` and
``flower.jpg``, shipped inside scikit-learn): each crop is a random square of 1.5-2x the target
side inside one quadrant, downscaled (BOX, then BICUBIC) to ``size``, so a class is "crops of
this part of this photo", as the issue's folder was crops of eight sources. The folder holds, as
the issue's did, one corrupt file and one grey file (a crop saved in mode L) among the images.

    PYTHONPATH=src python benchmarks/colour_folder.py --out /tmp/colour            # the folder only
    PYTHONPATH=src python benchmarks/colour_folder.py --out /tmp/colour --run runs/colour-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def write_colour_folder(root: str | Path, per_class: int = 100, size: int = 32, seed: int = 0) -> Path:
    """Write ``root/<photo>_<quadrant>/<i>.png`` (8 classes x ``per_class``) plus ``corrupt.png``
    in the first class; image 0 of the second class is saved grey. Returns ``root``."""
    from sklearn.datasets import load_sample_images

    root = Path(root)
    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    for path, photo in zip(photos.filenames, photos.images, strict=True):
        height, width = photo.shape[:2]
        for q, quadrant in enumerate(QUADRANTS):
            top, left = (q // 2) * height // 2, (q % 2) * width // 2
            folder = root / f"{Path(path).stem}_{quadrant}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                side = int(rng.integers(3 * size // 2, 2 * size + 1))
                y = top + int(rng.integers(0, height // 2 - side + 1))
                x = left + int(rng.integers(0, width // 2 - side + 1))
                crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
                crop.save(folder / f"{i:04d}.png")
    first, second = sorted(p for p in root.iterdir() if p.is_dir())[:2]
    (first / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    grey = second / "0000.png"
    Image.open(grey).convert("L").save(grey)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the images to")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--run", help="then run `rargen demo --data OUT --out RUN` (default settings)")
    parser.add_argument("--threads", type=int, help="torch threads for the demo")
    args = parser.parse_args()
    write_colour_folder(args.out, args.per_class, args.size)
    print(f"wrote {args.out}")
    if args.run:
        from rargen.cli.main import main as rargen

        argv = ["demo", "--data", args.out, "--out", args.run]
        raise SystemExit(rargen(argv + (["--threads", str(args.threads)] if args.threads else [])))


if __name__ == "__main__":
    main()
