"""The released RAR files by name, and ``from_pretrained``: a name, a Hub reference or a path -> a model.

``RELEASES`` is the one table of released files (spec Sec. 5 and 6; the official READMEs): where
each lives, the sampling preset the paper used with it, the tokenizer it pairs with, and how it
is verified. No digest of these files is published, so each is verified against the Hub's LFS
SHA-256 on first download and against the digest recorded then on every later use
(``rargen.hub.download``); the pytorch-fid Inception file publishes the first 8 hex digits of its SHA-256
in its name, which are checked as well. A revision is ``main`` until a commit is pinned here;
the first download records the commit it resolved to and later calls stay on it.

``resolve`` is the one function that turns what a user typed (``rar-xl``,
``hf://OWNER/REPO/FILE[@REVISION]``, a local folder or file) into a local path; every command
that takes a checkpoint, an official file, a reference batch or Inception weights calls it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from rargen.hub import download as hub
from rargen.weight_files import file_sha256


@dataclass(frozen=True)
class Release:
    name: str
    kind: str  # "generator" | "tokenizer" | "reference-batch" | "feature-net"
    source: str  # hf://OWNER/REPO/FILE@REVISION or https://...
    sample_preset: str | None = None  # SampleConfig preset of the paper (generators)
    tokenizer: str | None = None  # name of the paired tokenizer release (generators)
    sha256: str | None = None  # published digest; None: recorded on first download
    sha256_prefix: str | None = None  # a published prefix of the digest (e.g. in the file name)

    @property
    def verified_by(self) -> str:
        if self.sha256:
            return "published SHA-256"
        first = "the Hub's LFS SHA-256" if self.source.startswith(hub.HUB_SCHEME) else "nothing"
        prefix = f" and the published prefix {self.sha256_prefix}" if self.sha256_prefix else ""
        return f"recorded on first download (checked against {first}{prefix}), then against the record"


_ADM = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
_FID = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights"

RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release("rar-b", "generator", "hf://yucornetto/RAR/rar_b.bin@main", "rar-b", "maskgit-vqgan"),
        Release("rar-l", "generator", "hf://yucornetto/RAR/rar_l.bin@main", "rar-l", "maskgit-vqgan"),
        Release("rar-xl", "generator", "hf://yucornetto/RAR/rar_xl.bin@main", "rar-xl", "maskgit-vqgan"),
        Release("rar-xxl", "generator", "hf://yucornetto/RAR/rar_xxl.bin@main", "rar-xxl", "maskgit-vqgan"),
        Release(
            "maskgit-vqgan", "tokenizer", "hf://fun-research/TiTok/maskgit-vqgan-imagenet-f16-256.bin@main"
        ),
        # ADM's ImageNet 256x256 reference batch (the paper's FID/sFID/IS/precision/recall).
        Release("imagenet256", "reference-batch", f"{_ADM}/256/VIRTUAL_imagenet256_labeled.npz"),
        # ADM's ImageNet 512x512 reference batch (no published digest: recorded on first download).
        Release("imagenet512", "reference-batch", f"{_ADM}/512/VIRTUAL_imagenet512.npz"),
        # The FID Inception-v3 (TF inception-2015-12-05) as converted by pytorch-fid.
        Release(
            "fid-inception",
            "feature-net",
            f"{_FID}/pt_inception-2015-12-05-6726825d.pth",
            sha256_prefix="6726825d",
        ),
    )
}


def release_table() -> str:
    """The table as text (``rargen`` prints it in errors about unknown names)."""
    rows = [f"{r.name:<14} {r.kind:<16} {r.source}" for r in RELEASES.values()]
    return "\n".join(rows)


def find_release(spec: str | os.PathLike) -> Release | None:
    """The release a name refers to, or None for a path or a Hub reference."""
    return RELEASES.get(str(spec)) if not Path(spec).exists() else None


def _remote(spec: str) -> tuple[str, Release | None] | None:
    """(remote source, release or None) of a name or hf:// reference; None for a local path."""
    if Path(spec).exists():
        return None  # an existing local path wins over a name that happens to match it
    release = RELEASES.get(spec)
    if release is not None:
        return release.source, release
    if spec.startswith(hub.HUB_SCHEME):
        return spec, None
    return None


def fetch(source: str, release: Release | None = None) -> tuple[Path, str]:
    """A remote file (hf:// or https://), downloaded or from the cache, verified: (path, SHA-256)."""
    expected = release.sha256 if release else None
    if source.startswith(hub.HUB_SCHEME):
        return hub.hub_download(hub.HubFile.parse(source), expected)
    return hub.url_download(source, expected, release.sha256_prefix if release else None)


def converted_checkpoint(source: str, release: Release | None = None) -> Path:
    """The rargen checkpoint folder converted from an official file, cached by the file's SHA-256.

    The folder's weights digest is recorded at conversion and checked on every use; a call whose
    source was recorded before finds the folder without a request and without converting.
    """
    return _converted(source, release, verify=True)[0]


def _converted(source: str, release: Release | None, verify: bool) -> tuple[Path, nn.Module | None]:
    """(folder, the module when this call converted it, else None). ``verify``: hash the cached
    weights now; without it the caller's ``load`` verifies them (one hash, not two)."""
    settings = hub.cache_settings()
    key = hub.HubFile.parse(source).uri if source.startswith(hub.HUB_SCHEME) else source
    records = hub.read_records(settings)
    known = records["files"].get(key)
    if known is not None:
        folder = _valid_converted(settings, known["sha256"], records, verify)
        if folder is not None:
            return folder, None
    path, digest = fetch(source, release)
    folder = _valid_converted(settings, digest, hub.read_records(settings), verify)
    if folder is not None:
        return folder, None
    from rargen.checkpoint import WEIGHTS_NAME, load_official, read_record, remove_stale_temporaries, save

    module = load_official(path)  # torch.load(weights_only=True), after hub's format and digest checks
    folder = settings.rargen_cache / "converted" / digest
    # A conversion killed mid-write leaves a full-size hidden temporary (gigabytes for rar-xxl):
    # clear those of dead writers before writing another.
    remove_stale_temporaries(folder.parent)
    module.checkpoint_extra = {"converted_from": key, "source_sha256": digest}
    save(module, folder, extra=module.checkpoint_extra)
    written = read_record(folder)["weights_sha256"][WEIGHTS_NAME]  # hashed while saving
    hub.update_records(
        settings, "converted", digest, {"source": key, "weights_sha256": written, "path": str(folder)}
    )
    return folder, module


def _valid_converted(
    settings: hub.CacheSettings, digest: str, records: dict, verify: bool = True
) -> Path | None:
    from rargen.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_record

    entry = records["converted"].get(digest)
    folder = settings.rargen_cache / "converted" / digest
    if entry is None or not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        return None
    recorded = read_record(folder).get("weights_sha256", {}).get(WEIGHTS_NAME)
    if recorded != entry["weights_sha256"] or (verify and file_sha256(folder / WEIGHTS_NAME) != recorded):
        _forget_converted(settings, digest)  # changed since it was written: convert again
        return None
    return folder


def _forget_converted(settings: hub.CacheSettings, digest: str) -> None:
    shutil.rmtree(settings.rargen_cache / "converted" / digest, ignore_errors=True)
    hub.update_records(settings, "converted", digest, None)


def resolve(spec: str | os.PathLike, *, convert: bool = True) -> Path:
    """A local path for what the user typed: a released name, ``hf://OWNER/REPO/FILE[@REV]`` or a path.

    Remote files are downloaded (or taken from the cache) and verified. With ``convert``, an
    official generator or tokenizer file becomes a cached rargen checkpoint folder (what
    ``sample``/``serve``/``sweep`` read); without it the verified file itself is returned (what
    ``convert``, ``evaluate --reference`` and ``--inception`` read). Local paths are returned as
    they are.
    """
    text = os.fspath(spec)
    remote = _remote(text)
    if remote is None:
        path = Path(text)
        if not path.exists() and "/" not in text and not path.suffix:
            raise FileNotFoundError(
                f"{text!r} is neither a local file or folder nor a released name; released names:\n"
                + release_table()
                + "\nor pass hf://OWNER/REPO/FILE[@REVISION]"
            )
        return path
    source, release = remote
    if convert and (release is None or release.kind in {"generator", "tokenizer"}):
        return converted_checkpoint(source, release)
    return fetch(source, release)[0]


def from_pretrained(name_or_path: str | os.PathLike, *, device: str = "cpu", dtype=None) -> nn.Module:
    """A ready model or tokenizer (eval mode) from a released name, a Hub reference or a local path.

    ``from_pretrained("rar-b")`` downloads ``rar_b.bin`` from ``yucornetto/RAR`` once, converts it
    once, and loads the cached checkpoint folder afterwards (offline too).
    """
    release = _remote(os.fspath(name_or_path))
    if release is not None and release[1] is not None and release[1].kind not in {"generator", "tokenizer"}:
        raise ValueError(
            f"{name_or_path!r} is a {release[1].kind}, not a model; pass it to `rargen evaluate` instead"
        )
    from rargen.checkpoint import load, placed
    from rargen.weight_files import CheckpointError

    if release is None:  # a local path
        return load(resolve(name_or_path), device=device, dtype=dtype)
    # One build and one hash: a conversion made now is used as built (its weights were hashed as
    # they were written); a cached one is hashed once, by load's verification.
    folder, module = _converted(*release, verify=False)
    if module is None:
        try:
            module = load(folder)
        except CheckpointError:  # the cached folder changed on disk since its conversion
            _forget_converted(hub.cache_settings(), folder.name)
            folder, module = _converted(*release, verify=False)
            module = module if module is not None else load(folder)
    return placed(module, device, dtype)


def resolve_generator(
    model: str | os.PathLike, tokenizer: str | os.PathLike | None = None, preset: str | None = None
) -> tuple[Path, Path, str | None]:
    """(generator folder, tokenizer folder, sampling preset) for the commands that sample.

    A released generator name brings its paired tokenizer and the paper's sampling preset; an
    explicit ``tokenizer`` or ``preset`` overrides them. Anything else needs its tokenizer given.
    """
    release = find_release(model)
    if tokenizer is None:
        if release is None or release.tokenizer is None:
            raise ValueError(
                f"{os.fspath(model)!r} has no paired tokenizer: pass --tokenizer (a checkpoint folder, an "
                "official file, a released name such as maskgit-vqgan, or hf://OWNER/REPO/FILE)"
            )
        tokenizer = release.tokenizer
    if preset is None and release is not None:
        preset = release.sample_preset
    return resolve(model), resolve(tokenizer), preset


__all__ = ["RELEASES", "Release", "fetch", "find_release", "from_pretrained", "resolve", "resolve_generator"]
