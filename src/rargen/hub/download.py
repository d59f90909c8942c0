"""Downloads of released files into a local cache where every file is verified before it is read.

Two kinds of remote file, one cache:

* ``hf://OWNER/REPO/FILE[@REVISION]``: a file of a Hugging Face Hub model repository, fetched with
  ``huggingface_hub`` (its cache, its progress bar, its retries and in-download resume) into
  ``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``);
* ``https://...``: a plain file (ADM's reference batch, the FID Inception weights) fetched with the
  standard library into ``$HF_HOME/rargen/files``, resumable across runs from its ``.part`` file.

The environment is read at call time (not when ``huggingface_hub`` was imported): ``HF_ENDPOINT``
(a Hub mirror, or the local fake Hub of the tests), ``HF_HUB_OFFLINE=1`` (never send a request),
``HF_HOME`` / ``HF_HUB_CACHE`` (where files go) and ``RARGEN_MIRROR`` (a base URL that replaces
``https://`` for plain files: ``https://HOST/PATH`` is fetched as ``$RARGEN_MIRROR/HOST/PATH``).

Why a record beside the cache: a release whose SHA-256 is not published is trusted on first use.
The first download is checked against what is known (the table's digest, else the Hub's LFS
digest, which is the SHA-256 of the content), its SHA-256 is written to
``$HF_HOME/rargen/records.json``, and every later use is checked against that record. The record
also pins the revision: ``@main`` resolves to a commit once, and later calls use that commit
without asking the Hub, so a second call sends no request at all. A file that fails a check is
deleted from the cache before anything reads it as weights (official ``.bin`` files are pickles).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rargen.weight_files import file_sha256

HUB_SCHEME = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
INSTALL_HINT = "pip install 'rargen[hub]'  (or: pip install huggingface_hub)"
# Long enough for a slow link to answer, short enough that an unreachable host fails in seconds.
CONNECT_TIMEOUT_S = 10.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(FileNotFoundError):
    """A remote file could not be fetched (offline, unreachable, not found); the message says how to
    pass a local file instead. A FileNotFoundError, so callers that accept a missing local file
    handle it the same way."""


class IntegrityError(ValueError):
    """A downloaded or cached file is not what was expected (digest, size or format); it was removed."""


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub model repository, at a revision (a branch, a tag or a commit)."""

    repo: str  # "OWNER/NAME"
    filename: str  # path inside the repository
    revision: str = "main"

    @classmethod
    def parse(cls, uri: str) -> HubFile:
        """``hf://OWNER/REPO/FILE[@REVISION]`` -> HubFile (FILE may contain slashes)."""
        if not uri.startswith(HUB_SCHEME):
            raise ValueError(f"{uri!r} is not a Hub reference; expected hf://OWNER/REPO/FILE[@REVISION]")
        body, _, revision = uri[len(HUB_SCHEME) :].partition("@")
        parts = body.split("/")
        if len(parts) < 3 or not all(parts) or (revision == "" and uri.endswith("@")):
            raise ValueError(
                f"{uri!r} is not a valid Hub reference; expected hf://OWNER/REPO/FILE[@REVISION], "
                "e.g. hf://yucornetto/RAR/rar_b.bin"
            )
        return cls("/".join(parts[:2]), "/".join(parts[2:]), revision or "main")

    @property
    def uri(self) -> str:
        return f"{HUB_SCHEME}{self.repo}/{self.filename}@{self.revision}"

    def url(self, endpoint: str) -> str:
        quoted = urllib.parse.quote(self.filename)
        return f"{endpoint}/{self.repo}/resolve/{urllib.parse.quote(self.revision, safe='')}/{quoted}"


@dataclass(frozen=True)
class CacheSettings:
    endpoint: str
    offline: bool
    hub_cache: Path  # huggingface_hub's cache (models--OWNER--NAME/...)
    rargen_cache: Path  # records.json, converted/, files/
    mirror: str | None  # base URL for plain-HTTPS files


def cache_settings() -> CacheSettings:
    """The cache locations and network policy from the environment, read now."""
    env = os.environ
    home = Path(os.path.expanduser(env.get("HF_HOME") or "~/.cache/huggingface"))
    hub_cache = Path(os.path.expanduser(env.get("HF_HUB_CACHE") or str(home / "hub")))
    offline = (env.get("HF_HUB_OFFLINE") or "").strip().lower() in {"1", "true", "yes", "on"}
    mirror = env.get("RARGEN_MIRROR") or None
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    return CacheSettings(
        endpoint, offline, hub_cache, home / "rargen", mirror.rstrip("/") if mirror else None
    )


# --------------------------------------------------------------------------------------- records


def _records_path(settings: CacheSettings) -> Path:
    return settings.rargen_cache / "records.json"


def read_records(settings: CacheSettings) -> dict[str, Any]:
    path = _records_path(settings)
    if not path.is_file():
        return {"files": {}, "converted": {}}
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it to start a fresh record") from None
    records.setdefault("files", {})
    records.setdefault("converted", {})
    return records


def update_records(settings: CacheSettings, section: str, key: str, value: dict[str, Any] | None) -> None:
    """Set (or with None, drop) one entry, written atomically."""
    records = read_records(settings)
    if value is None:
        records[section].pop(key, None)
    else:
        records[section][key] = value
    path = _records_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".records-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(records, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ verification


def check_format(path: Path, name: str) -> None:
    """Refuse a file whose first bytes do not match its kind (an HTML error page saved as weights).

    torch.save files (``.bin``/``.pt``/``.pth``) and ``.npz`` are zip archives; ``.safetensors``
    starts with an 8-byte header length and a JSON object. Checked before anything parses the file.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    suffix = Path(name).suffix
    if suffix in {".bin", ".pt", ".pth", ".npz"}:
        ok = head.startswith(b"PK\x03\x04")
        expected = "a zip archive (torch.save / numpy .npz)"
    elif suffix == ".safetensors":
        ok = len(head) > 8 and head[8:9] == b"{"
        expected = "a safetensors file"
    else:
        return
    if not ok:
        looks = " (it looks like an HTML/text page)" if head.lstrip()[:1] in (b"<", b"{") else ""
        raise IntegrityError(f"the downloaded {name} is not {expected}{looks}; first bytes {head[:12]!r}")


def verify(path: Path, name: str, expected_sha256: str | None, sha256_prefix: str | None = None) -> str:
    """Format and digest checks of a fetched file; returns its SHA-256."""
    check_format(path, name)
    digest = file_sha256(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise IntegrityError(f"{name}: SHA-256 {digest} does not match the expected {expected_sha256}")
    if sha256_prefix is not None and not digest.startswith(sha256_prefix):
        raise IntegrityError(f"{name}: SHA-256 {digest} does not start with the published {sha256_prefix}")
    return digest


def _remove_cached(path: Path) -> None:
    """Delete a cache entry and, for huggingface_hub's snapshot symlinks, the blob behind it."""
    try:
        target = path.resolve()
        path.unlink(missing_ok=True)
        if target != path:
            target.unlink(missing_ok=True)
    except OSError:
        pass


def _local_hint(name: str) -> str:
    return f"or download {name} yourself and pass its local path instead of the name"


# ------------------------------------------------------------------------------------- Hub files


def _import_hub():
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401  (a submodule: make ``huggingface_hub.errors`` exist)
    except ImportError:
        raise DownloadError(
            f"downloading from the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}"
        ) from None
    return huggingface_hub


def hub_download(ref: HubFile, expected_sha256: str | None = None) -> tuple[Path, str]:
    """The verified local path of ``ref`` and its SHA-256, downloading it if needed.

    A file recorded before is used without a request (re-hashed against the record). A file
    already in huggingface_hub's cache without a record (fetched by another tool) is verified and
    recorded without a request too.
    """
    settings = cache_settings()
    record = read_records(settings)["files"].get(ref.uri)
    if record is not None and Path(record["path"]).is_file():
        path = Path(record["path"])
        try:
            verify(path, ref.filename, record["sha256"])
            if expected_sha256 is not None and record["sha256"] != expected_sha256:
                raise IntegrityError(
                    f"{ref.filename}: recorded SHA-256 {record['sha256']} != {expected_sha256}"
                )
        except IntegrityError as error:
            _remove_cached(path)
            update_records(settings, "files", ref.uri, None)
            raise IntegrityError(
                f"the cached {ref.uri} changed since it was verified ({error}); it was removed from the "
                "cache, run again to download it again"
            ) from None
        return path, record["sha256"]

    url = ref.url(settings.endpoint)
    hub = _import_hub()
    cached = hub.try_to_load_from_cache(
        ref.repo, ref.filename, cache_dir=str(settings.hub_cache), revision=ref.revision
    )
    if isinstance(cached, str) and os.path.isfile(cached):
        path = Path(cached)  # .../snapshots/<commit>/<filename>, a link to .../blobs/<etag>
        commit = path.parts[len(path.parts) - 1 - len(ref.filename.split("/"))]
        lfs_sha256 = path.resolve().name
    else:
        if settings.offline:
            raise DownloadError(
                f"HF_HUB_OFFLINE is set and {ref.filename} of {ref.repo} (revision {ref.revision}) is not in "
                f"the cache {settings.hub_cache}; unset HF_HUB_OFFLINE to download it from {url}, "
                + _local_hint(ref.filename)
            )
        path, commit, lfs_sha256 = _fetch_from_hub(hub, ref, url, settings)
    try:
        if not _SHA256.match(lfs_sha256 or ""):
            lfs_sha256 = None  # not an LFS file: the Hub's ETag is a git hash, not the content's SHA-256
        digest = verify(path, ref.filename, expected_sha256 or lfs_sha256)
    except IntegrityError as error:
        _remove_cached(path)
        raise IntegrityError(f"{error}; downloaded from {url}, removed from the cache") from None
    entry = {"path": str(path), "sha256": digest, "commit": commit, "size": path.stat().st_size}
    update_records(settings, "files", ref.uri, entry)
    if ref.revision != commit:
        update_records(settings, "files", HubFile(ref.repo, ref.filename, commit).uri, entry)
    return path, digest


def _fetch_from_hub(hub, ref: HubFile, url: str, settings: CacheSettings) -> tuple[Path, str, str | None]:
    """One HEAD (which fails fast when the Hub is unreachable), then huggingface_hub's download."""
    errors = hub.errors

    def failed(reason: str) -> DownloadError:
        return DownloadError(
            f"could not download {ref.filename} from the Hugging Face Hub repository {ref.repo} "
            f"(revision {ref.revision}, {url}): {reason}; check the network or HF_ENDPOINT, "
            + _local_hint(ref.filename)
        )

    try:
        meta = hub.get_hf_file_metadata(url, timeout=CONNECT_TIMEOUT_S)
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as error:
        raise failed(f"not found ({type(error).__name__})") from None
    except errors.HfHubHTTPError as error:
        raise failed(f"HTTP {getattr(error.response, 'status_code', '?')}") from None
    except Exception as error:  # connection refused, DNS failure, timeout: the HTTP client's own types
        raise failed(f"{type(error).__name__}: {error}") from None
    if not meta.commit_hash or not meta.etag:
        raise failed("the server's answer has no X-Repo-Commit/ETag header: HF_ENDPOINT is not a Hub")
    try:
        local = hub.hf_hub_download(
            ref.repo,
            ref.filename,
            revision=meta.commit_hash,
            cache_dir=str(settings.hub_cache),
            endpoint=settings.endpoint,
        )
    except errors.HfHubHTTPError as error:
        raise failed(f"HTTP {getattr(error.response, 'status_code', '?')} during the download") from None
    except OSError as error:  # size mismatch of a cut-off download, disk full
        raise failed(f"{type(error).__name__}: {error}") from None
    except Exception as error:
        raise failed(f"{type(error).__name__}: {error}") from None
    return Path(local), meta.commit_hash, meta.etag


# ----------------------------------------------------------------------------------- plain HTTPS


def url_download(
    url: str, expected_sha256: str | None = None, sha256_prefix: str | None = None
) -> tuple[Path, str]:
    """The verified local copy of a plain-HTTPS file and its SHA-256, downloading it if needed.

    Resumes from ``<file>.part`` with a Range request; the file gets its final name only after the
    size, format and digest checks pass.
    """
    settings = cache_settings()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL")
    name = Path(parts.path).name
    dest = settings.rargen_cache / "files" / parts.netloc / parts.path.lstrip("/")
    record = read_records(settings)["files"].get(url)
    if record is not None and dest.is_file():
        try:
            verify(dest, name, record["sha256"])
        except IntegrityError as error:
            _remove_cached(dest)
            update_records(settings, "files", url, None)
            raise IntegrityError(
                f"the cached {url} changed since it was verified ({error}); removed"
            ) from None
        return dest, record["sha256"]
    fetch_url = f"{settings.mirror}/{parts.netloc}{parts.path}" if settings.mirror else url
    if settings.offline:
        raise DownloadError(
            f"HF_HUB_OFFLINE is set and {name} is not in the cache {dest.parent}; unset it to download "
            f"{fetch_url}, " + _local_hint(name)
        )
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        _http_get_resumable(fetch_url, part, name)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        raise DownloadError(
            f"could not download {name} from {fetch_url}: {reason}; check the network or RARGEN_MIRROR "
            f"(a partial download, if any, is kept in {part} and resumed next time), " + _local_hint(name)
        ) from None
    try:
        digest = verify(part, name, expected_sha256, sha256_prefix)
    except IntegrityError as error:
        part.unlink(missing_ok=True)
        raise IntegrityError(f"{error}; downloaded from {fetch_url}, removed") from None
    os.replace(part, dest)
    update_records(settings, "files", url, {"path": str(dest), "sha256": digest, "size": dest.stat().st_size})
    return dest, digest


def _http_get_resumable(url: str, part: Path, name: str) -> None:
    from rargen.progress import progress_bar

    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the .part file is already complete (or stale): verify decides
            return
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        received = have
        with (
            open(part, mode) as f,
            progress_bar(total=total, initial=have, unit="B", unit_scale=True, desc=name) as bar,
        ):
            while block := response.read(1 << 20):
                f.write(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise OSError(f"the download stopped at {received} of {total} bytes")
