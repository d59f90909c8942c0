"""What a class is in an image folder: the one rule every command that reads ``ROOT/<class>/<image>`` follows.

``scan_folder(root)`` walks the tree once and returns the classes, their files and what it left
out and why; it refuses (ValueError) a tree whose labels would be wrong. The rule:

- A class is a direct sub-folder of ``ROOT``; its images are every file with an image extension
  anywhere below it (sorted, so the order is reproducible). With no sub-folder at all, the images
  directly in ``ROOT`` are unlabelled data (one class-less set).
- Names starting with ``.`` are hidden (``.git``, ``.ipynb_checkpoints``, ``._x.jpg`` from macOS):
  skipped at every level, and each one is listed in what was excluded. Rename a folder to make it
  a class.
- Images directly in ``ROOT`` beside class folders belong to no class: excluded and listed, with
  the fix (move them into a class folder).
- Class names that differ only in case or surrounding spaces (``Cat``, ``cat``, ``CAT ``) are
  refused: they would be separate classes that a reader (and the server's name lookup, which
  ignores case) cannot tell apart, and a case-insensitive file system would merge them.
- A class folder with no image file is refused (an empty class trains nothing and shifts every
  label after it); so is one with no readable image (``check_readable``, run by the source).
- Links: a class folder may be a link to a folder elsewhere (data assembled from several disks),
  followed when it overlaps no other class. A class folder that resolves to ``ROOT`` or above it,
  or to (a folder inside or around) another class, is refused naming both paths: the same files
  under two labels leak held-out images into training. A file reached twice (a link to a file of
  another class) is refused the same way; twice in one class, it is kept once and listed.
  Links to folders inside a class are not followed (listed). Hard links are not detected.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

# Why an entry was left out; the summary groups by these, so each is a fixed text.
HIDDEN = "hidden (its name starts with '.'); rename it to use it"
AT_ROOT = "an image beside the class folders belongs to no class; move it into a class folder"
NOT_AN_IMAGE = f"not an image file (extensions: {' '.join(IMAGE_EXTENSIONS)})"
LINKED_SUBFOLDER = "a link to a folder inside a class folder is not followed; copy or move its files"
SAME_FILE = "the same file as another image of its class (a link); counted once"


def class_name_key(name: str) -> str:
    """What two class names must not share: the name with case, surrounding spaces and Unicode
    composition ignored (a macOS folder name arrives decomposed, a typed one composed)."""
    return unicodedata.normalize("NFC", name).strip().casefold()


@dataclass(frozen=True)
class FolderScan:
    """An image folder as classes: ``class_names`` (``()`` for unlabelled data), ``class_files``
    (one sorted tuple of paths per class, or one for unlabelled data), ``class_paths`` (the class
    folders, or ``(root,)``) and ``excluded``: ``{"path", "reason"}`` for each entry left out."""

    root: Path
    class_names: tuple[str, ...]
    class_files: tuple[tuple[Path, ...], ...]
    class_paths: tuple[Path, ...]
    excluded: tuple[dict[str, str], ...]

    @property
    def num_files(self) -> int:
        return sum(len(files) for files in self.class_files)


def scan_folder(root: str | os.PathLike) -> FolderScan:
    """``root`` as classes by the rule of this module; ValueError for a tree it refuses."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {str(root)!r}")
    excluded: list[dict[str, str]] = []
    folders, loose = [], []
    with os.scandir(root) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            excluded.append({"path": entry.name, "reason": HIDDEN})
        elif entry.is_dir():  # follows a link: a linked class folder is checked below
            folders.append(entry.name)
        elif _is_image_name(entry.name):
            loose.append(entry.name)
        else:
            excluded.append({"path": entry.name, "reason": NOT_AN_IMAGE})
    if not folders:
        if not loose:
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(root)!r}: put them in class "
                "folders (ROOT/<class>/<image>) or, unlabelled, directly in the folder"
            )
        files = tuple(root / name for name in loose)
        return FolderScan(root, (), (files,), (root,), tuple(excluded))
    excluded += [{"path": name, "reason": AT_ROOT} for name in loose]
    _refuse_names_differing_in_case(root, folders)
    paths = tuple(root / name for name in folders)
    reals = _refuse_overlapping_folders(root, paths)
    class_files, links = [], set()
    for path in paths:
        files, linked, left_out = _images_below(path, root)
        class_files.append(files)
        links |= linked
        excluded += left_out
    _refuse_empty_classes(folders, paths, class_files)
    _refuse_files_in_two_classes(root, paths, reals, links, class_files, excluded)
    return FolderScan(root, tuple(folders), tuple(class_files), paths, tuple(excluded))


def check_readable(scan: FolderScan, load: Callable[[Path], Any]) -> None:
    """Refuse a class (or unlabelled folder) none of whose files ``load`` can read.

    Each class's files are tried in order until one loads, so a healthy tree costs one decode per
    class; a class of unreadable files would otherwise stay a class that no image teaches.
    """
    unreadable = []
    for name, path, files in zip(scan.class_names or ("",), scan.class_paths, scan.class_files, strict=True):
        first_error = ""
        for file in files:
            try:
                load(file)
                break
            except Exception as error:  # noqa: BLE001 - any failure to read means "not readable"
                first_error = first_error or f"{file.name}: {type(error).__name__}: {error}"
        else:
            what = f"class {name!r} ({path})" if name else f"the folder {str(path)!r}"
            first = " ".join(first_error.split())
            unreadable.append(f"{what}: none of its {len(files)} image file(s) can be read (first: {first})")
    if unreadable:
        more = f"; ... and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
        raise ValueError(f"{'; '.join(unreadable[:10])}{more}; fix or replace the files or remove the folder")


def describe_scan(scan: FolderScan, what: str, limit: int = 8) -> str:
    """The console summary of a scan: classes with their file counts, what was excluded and why."""
    counts = [len(files) for files in scan.class_files]
    if scan.class_names:
        shown = ", ".join(f"{n} {c}" for n, c in zip(scan.class_names[:limit], counts, strict=False))
        more = f", ... ({len(counts) - limit} more; fewest {min(counts)})" if len(counts) > limit else ""
        lines = [f"{what}: {len(counts)} classes, {scan.num_files} image files ({shown}{more})"]
    else:
        lines = [f"{what}: {scan.num_files} image files, unlabelled (no class folders)"]
    if scan.excluded:
        lines.append(f"  excluded {len(scan.excluded)}:")
    by_reason: dict[str, list[str]] = {}
    for item in scan.excluded:
        by_reason.setdefault(item["reason"], []).append(item["path"])
    for reason, paths in by_reason.items():
        names = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        lines.append(f"    {len(paths)} {reason}: {names}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The walk and the refusals


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_below(folder: Path, root: Path) -> tuple[tuple[Path, ...], set[Path], list[dict[str, str]]]:
    """(sorted image files below ``folder``, those that are links, what was left out). Links to
    folders are not entered, so the walk has no cycles; links to files are kept (and checked for
    duplicates by the caller). ``DirEntry`` knows links from the listing: no call per file."""
    files: list[Path] = []
    links: set[Path] = set()
    excluded = []
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.name.startswith("."):
                    excluded.append({"path": str(path.relative_to(root)), "reason": HIDDEN})
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                    # A folder named like an image is kept as a file too, so the reader lists it
                    # ("not a regular file (a folder)") rather than it vanishing.
                    if _is_image_name(entry.name):
                        files.append(path)
                elif _is_image_name(entry.name):
                    files.append(path)
                    if entry.is_symlink():
                        links.add(path)
                elif entry.is_symlink() and entry.is_dir():
                    excluded.append({"path": str(path.relative_to(root)), "reason": LINKED_SUBFOLDER})
                else:
                    excluded.append({"path": str(path.relative_to(root)), "reason": NOT_AN_IMAGE})
    return tuple(sorted(files)), links, excluded


def _refuse_names_differing_in_case(root: Path, folders: list[str]) -> None:
    groups: dict[str, list[str]] = {}
    for name in folders:
        groups.setdefault(class_name_key(name), []).append(name)
    clashes = [names for names in groups.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" / ".join(repr(n) for n in names) for names in clashes[:10])
        raise ValueError(
            f"{str(root)!r}: class folders whose names differ only in case or spaces would be separate "
            f"classes that nobody can tell apart: {listed}; rename them to differ in more than case "
            "(or merge them into one folder)"
        )


def _refuse_overlapping_folders(root: Path, paths: tuple[Path, ...]) -> list[Path]:
    """The real path of each class folder; refused when two of them share files (a link to another
    class, to a folder inside or around one, or to the root or above it): those files would have
    two labels."""
    real_root = Path(os.path.realpath(root))
    owners: dict[Path, Path] = {}  # real path -> the class folder that reaches it
    reals = []
    for path in paths:
        real = Path(os.path.realpath(path))
        if real == real_root or real in real_root.parents:
            raise ValueError(
                f"class folder {str(path)!r} is a link to {str(real)!r}, which holds the whole image "
                f"folder {str(root)!r}: its images would count twice; remove the link"
            )
        if real in owners:
            raise ValueError(_two_labels(owners[real], path, real))
        owners[real] = path
        reals.append(real)
    for real, path in owners.items():
        for parent in real.parents:  # one class folder inside another (either may be the link)
            if parent in owners:
                raise ValueError(_two_labels(owners[parent], path, real))
    return reals


def _two_labels(path: Path, other: Path, real: Path) -> str:
    return (
        f"class folders {str(other)!r} and {str(path)!r} hold the same files (through a link, at "
        f"{str(real)!r}): each image would have two labels and held-out images would leak into "
        "training; remove the link or give each class its own files"
    )


def _refuse_empty_classes(folders: list[str], paths: tuple[Path, ...], class_files: list) -> None:
    empty = [f"{n!r} ({p})" for n, p, files in zip(folders, paths, class_files, strict=True) if not files]
    if empty:
        raise ValueError(
            f"class folder(s) with no image file ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty[:10])}"
            f"{' ...' if len(empty) > 10 else ''}; an empty class would be a label no image teaches: "
            "add images or remove the folder"
        )


def _refuse_files_in_two_classes(
    root: Path,
    paths: tuple[Path, ...],
    reals: list[Path],
    links: set[Path],
    class_files: list,
    excluded: list[dict[str, str]],
) -> None:
    """A file linked into another class is refused; reached twice in one class, kept once.

    A file's real path is its class folder's real path and its path below it (links to folders
    below are not entered), or its own ``realpath`` when it is a link: one ``realpath`` per class
    and per linked file, nothing per plain file."""
    owner: dict[Path, tuple[int, Path]] = {}
    for index, (files, folder, real_folder) in enumerate(zip(class_files, paths, reals, strict=True)):
        dropped = set()
        for path in sorted(files, key=lambda p: p in links):  # plain files first: a link is the copy
            real = Path(os.path.realpath(path)) if path in links else real_folder / path.relative_to(folder)
            if real not in owner:
                owner[real] = (index, path)
            elif owner[real][0] == index:
                dropped.add(path)
                excluded.append({"path": str(path.relative_to(root)), "reason": SAME_FILE})
            else:
                raise ValueError(
                    f"{str(owner[real][1])!r} and {str(path)!r} are the same file (through a link) in two "
                    "classes: it would have two labels and could be held out and trained on at once; "
                    "remove the link"
                )
        class_files[index] = tuple(path for path in files if path not in dropped)
