"""Released files by name and hf:// references, against a local fake Hub (never the network).

The fake Hub (tests/fake_hub.py) serves small random-weight files in the official layouts: the
RAR generator of tests/data/official_rar_a (made by the official code) and a MaskGIT-VQGAN with
the official key layout, both as torch.save ``.bin`` files like the released ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rargen
from fake_hub import COMMIT, FakeHub, official_bin, paired_generator_bin, serving_hub
from rargen.cli.main import main
from rargen.hub import download as hub
from rargen.hub import releases as pretrained
from rargen.model import RAR


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    with serving_hub(tmp_path, monkeypatch) as server:
        yield server


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def logits_of(model: RAR) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    tokens = torch.randint(0, cfg.codebook_size, (2, cfg.num_image_tokens), generator=g)
    orders = rargen.sample_orders(2, cfg.num_image_tokens, random_prob=1.0, generator=g)
    with torch.inference_mode():
        return model(tokens, torch.tensor([1, cfg.null_label]), orders)


def test_hub_reference_parsing() -> None:
    ref = hub.HubFile.parse("hf://yucornetto/RAR/rar_b.bin")
    assert (ref.repo, ref.filename, ref.revision) == ("yucornetto/RAR", "rar_b.bin", "main")
    ref = hub.HubFile.parse(f"hf://owner/repo/sub/dir/w.bin@{COMMIT}")
    assert (ref.repo, ref.filename, ref.revision) == ("owner/repo", "sub/dir/w.bin", COMMIT)
    assert ref.url("http://h") == f"http://h/owner/repo/resolve/{COMMIT}/sub/dir/w.bin"
    for bad in ("hf://owner/repo", "hf://owner//x.bin", "hf://o/r/x.bin@"):
        with pytest.raises(ValueError, match="hf://OWNER/REPO/FILE"):
            hub.HubFile.parse(bad)


def test_release_table_names_the_paper_files() -> None:
    table = pretrained.RELEASES
    for size in ("b", "l", "xl", "xxl"):
        release = table[f"rar-{size}"]
        assert release.source == f"hf://yucornetto/RAR/rar_{size}.bin@main"
        assert release.sample_preset == f"rar-{size}" and release.tokenizer == "maskgit-vqgan"
        rargen.SampleConfig.from_name(release.sample_preset)  # a real preset
    assert table["maskgit-vqgan"].source == "hf://fun-research/TiTok/maskgit-vqgan-imagenet-f16-256.bin@main"
    assert all("recorded on first download" in r.verified_by for r in table.values() if r.sha256 is None)


def test_hf_download_converts_to_the_same_logits_and_the_second_call_sends_nothing(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch
) -> None:
    data = official_bin("official_rar_a")
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", data)
    local = rargen.load(write(tmp_path, "rar_a.bin", data))

    remote = rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")
    assert torch.equal(logits_of(remote), logits_of(local))
    first = fake_hub.count()
    assert fake_hub.count("GET") == 1 and first <= 3  # our HEAD, huggingface_hub's HEAD, one GET

    # Second call: no request, no conversion (the converter would fail if it were called).
    monkeypatch.setattr("rargen.checkpoint.load_official", lambda *a: pytest.fail("converted twice"))
    again = rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")
    assert fake_hub.count() == first
    assert torch.equal(logits_of(again), logits_of(local))
    folder = pretrained.resolve("hf://yucornetto/RAR/rar_a.bin")
    assert folder.name == hashlib.sha256(data).hexdigest()  # the converted folder is keyed by the digest
    assert json.loads((folder / "config.json").read_text())["extra"]["source_sha256"] == folder.name


def count_calls(monkeypatch, module_name: str, function: str) -> list[int]:
    """Count calls of ``module_name.function`` through every rargen module that imported it."""
    import sys

    original, calls = getattr(sys.modules[module_name], function), []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "rargen" and getattr(module, function, None) is original:
            monkeypatch.setattr(module, function, counted)
    return calls


def test_from_pretrained_builds_once_and_hashes_the_cached_weights_once(
    fake_hub: FakeHub, monkeypatch
) -> None:
    """It built the model twice on the first call (convert, then load the folder) and hashed the
    cached weights twice on every later call (the cache's check, then load's): about 1 s/GB each."""
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", official_bin("official_rar_a"))
    builds = count_calls(monkeypatch, "rargen.checkpoint", "build")
    first = rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")
    assert len(builds) == 1
    hashes = count_calls(monkeypatch, "rargen.weight_files", "file_sha256")
    again = rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")
    assert (len(builds), len(hashes)) == (2, 1)
    assert torch.equal(logits_of(again), logits_of(first))
    assert again.checkpoint_extra == first.checkpoint_extra and "source_sha256" in first.checkpoint_extra


def test_a_converted_folder_changed_on_disk_is_converted_again(fake_hub: FakeHub) -> None:
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", official_bin("official_rar_a"))
    first = rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")
    folder = pretrained.resolve("hf://yucornetto/RAR/rar_a.bin")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the tensor bytes
    weights.write_bytes(bytes(data))
    again = rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")
    assert torch.equal(logits_of(again), logits_of(first))
    assert weights.read_bytes() != bytes(data)  # written anew


def test_a_conversion_killed_mid_write_leaves_no_temporary_in_the_cache(fake_hub: FakeHub) -> None:
    """Issue 25 item 6: a killed conversion left a full-size hidden ``.DIGEST.tmp-PID-*`` folder in
    the cache forever (gigabytes for rar-xxl); the next conversion into that cache removes it. A
    live writer's temporary (this process's pid) is left alone."""
    data = official_bin("official_rar_a")
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", data)
    converted = hub.cache_settings().rargen_cache / "converted"
    converted.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = converted / f".{hashlib.sha256(data).hexdigest()}.tmp-{int(dead.stdout)}-x1"
    live = converted / f".other.tmp-{os.getpid()}-x2"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
    rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")
    assert not stale.exists() and live.exists()


def test_vqgan_tokenizer_over_the_hub_decodes_like_the_local_file(fake_hub: FakeHub, tmp_path: Path) -> None:
    data = official_bin("official_vqgan_small")
    fake_hub.add_hub_file("fun-research/TiTok", "vq.bin", data)
    local = rargen.load(write(tmp_path, "vq.bin", data))
    remote = rargen.from_pretrained("hf://fun-research/TiTok/vq.bin")
    codes = torch.randint(0, 64, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(remote.decode(codes), local.decode(codes))


def test_interrupted_download_resumes_with_a_range_request(fake_hub: FakeHub, monkeypatch) -> None:
    import huggingface_hub.constants

    # huggingface_hub keeps what arrived in whole chunks (10 MB by default); small chunks let a
    # 1.2 MB file show the resume.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    data = official_bin("official_rar_a")
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", data)
    cut = len(data) // 3
    fake_hub.cut_next["yucornetto/RAR/rar_a.bin"] = cut
    path = pretrained.resolve("hf://yucornetto/RAR/rar_a.bin", convert=False)
    assert path.read_bytes() == data
    gets = [r for m, _, r in fake_hub.requests if m == "GET"]
    assert len(gets) == 2 and gets[0] is None
    start = int(gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut  # the second GET asked only for the rest


def test_plain_file_resumes_across_runs_from_its_part_file(fake_hub: FakeHub, tmp_path: Path) -> None:
    url = "https://files.example/ref/batch.npz"
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.arange(5000, dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(3, axis=-1))
    data = buffer.getvalue()
    fake_hub.add_plain_file(url, data)
    fake_hub.cut_next["files.example/ref/batch.npz"] = 1000
    with pytest.raises(hub.DownloadError, match="resumed next time"):
        hub.url_download(url)
    path, digest = hub.url_download(url)
    assert path.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()
    assert [r for m, _, r in fake_hub.requests if m == "GET"] == [None, "bytes=1000-"]


def test_digest_mismatch_is_refused_and_not_left_in_the_cache(fake_hub: FakeHub, tmp_path: Path) -> None:
    data = official_bin("official_rar_a")
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", data)
    fake_hub.claimed_sha256["yucornetto/RAR/rar_a.bin"] = "0" * 64  # the Hub's LFS digest disagrees
    with pytest.raises(hub.IntegrityError, match="does not match"):
        rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")
    cache = Path(hub.cache_settings().hub_cache)
    assert not [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size == len(data)]
    assert hub.read_records(hub.cache_settings())["files"] == {}

    # A published digest in the table that the file does not have: refused the same way.
    fake_hub.claimed_sha256.clear()
    release = pretrained.Release("tiny", "generator", "hf://yucornetto/RAR/rar_a.bin@main", sha256="1" * 64)
    with pytest.raises(hub.IntegrityError, match="expected 1111"):
        pretrained.fetch(release.source, release)


def test_a_cached_file_changed_after_its_record_is_refused(fake_hub: FakeHub) -> None:
    data = official_bin("official_rar_a")
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", data)
    path = pretrained.resolve("hf://yucornetto/RAR/rar_a.bin", convert=False)
    path.resolve().write_bytes(data[:-10] + b"0123456789")  # same size, other bytes
    with pytest.raises(hub.IntegrityError, match="changed since it was verified"):
        pretrained.resolve("hf://yucornetto/RAR/rar_a.bin", convert=False)
    assert not path.exists()
    assert pretrained.resolve("hf://yucornetto/RAR/rar_a.bin", convert=False).read_bytes() == data


def test_html_error_page_saved_as_weights_is_refused_before_unpickling(
    fake_hub: FakeHub, monkeypatch
) -> None:
    page = b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>"
    fake_hub.add_hub_file(
        "yucornetto/RAR", "rar_b.bin", page
    )  # its LFS digest is honest: only the format tells
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(hub.IntegrityError, match="not a zip archive.*HTML"):
        rargen.from_pretrained("hf://yucornetto/RAR/rar_b.bin")
    cache = Path(hub.cache_settings().hub_cache)
    assert not [p for p in cache.rglob("*") if p.is_file() and p.read_bytes() == page]


def test_offline_with_an_empty_cache_fails_clearly_without_a_request(
    fake_hub: FakeHub, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["sample", "--model", "rar-b", "--per-class", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and fake_hub.count() == 0
    assert "yucornetto/RAR" in err and "rar_b.bin" in err and "HF_HUB_OFFLINE" in err
    assert f"{fake_hub.url}/yucornetto/RAR/resolve/main/rar_b.bin" in err and "local path" in err
    assert len(err.strip().splitlines()) == 1


def test_unreachable_hub_fails_clearly(fake_hub: FakeHub, tmp_path, monkeypatch, capsys) -> None:
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code = main(["convert", "official-rar", "rar-xl", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "yucornetto/RAR" in err and "rar_xl.bin" in err and f"127.0.0.1:{port}/yucornetto/RAR" in err
    assert "local path" in err


def test_warm_cache_works_offline_and_with_the_hub_gone(fake_hub: FakeHub, monkeypatch) -> None:
    data = official_bin("official_rar_a")
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", data)
    first = logits_of(rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin"))
    requests = fake_hub.count()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(logits_of(rargen.from_pretrained("hf://yucornetto/RAR/rar_a.bin")), first)
    # The file itself (for `rargen convert`) is served from huggingface_hub's cache, verified.
    assert pretrained.resolve("hf://yucornetto/RAR/rar_a.bin", convert=False).read_bytes() == data
    # Pinned: @main resolved to a commit once; that commit works offline too.
    assert pretrained.resolve(f"hf://yucornetto/RAR/rar_a.bin@{COMMIT}", convert=False).read_bytes() == data
    assert fake_hub.count() == requests


def test_file_already_in_the_hub_cache_is_verified_and_used_offline(fake_hub: FakeHub, monkeypatch) -> None:
    data = official_bin("official_rar_a")
    fake_hub.add_hub_file("yucornetto/RAR", "rar_a.bin", data)
    import huggingface_hub

    settings = hub.cache_settings()
    huggingface_hub.hf_hub_download(
        "yucornetto/RAR", "rar_a.bin", cache_dir=str(settings.hub_cache), endpoint=settings.endpoint
    )  # fmt: skip  (another tool's download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = fake_hub.count()
    assert pretrained.resolve("hf://yucornetto/RAR/rar_a.bin", convert=False).read_bytes() == data
    assert fake_hub.count() == requests


def test_missing_huggingface_hub_names_the_install_command(fake_hub: FakeHub, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(hub.DownloadError, match=r"pip install 'rargen\[hub\]'"):
        pretrained.resolve("hf://yucornetto/RAR/rar_a.bin")


def test_unknown_name_lists_the_released_ones() -> None:
    with pytest.raises(FileNotFoundError, match="rar-xl"):
        pretrained.resolve("rar-xs")


def test_sample_cli_with_a_released_name_picks_tokenizer_and_preset(fake_hub: FakeHub, tmp_path, monkeypatch):
    fake_hub.add_hub_file("owner/RAR", "gen.bin", paired_generator_bin())
    fake_hub.add_hub_file("owner/TiTok", "vq.bin", official_bin("official_vqgan_small"))
    releases = dict(pretrained.RELEASES)
    gen = "hf://owner/RAR/gen.bin@main"
    releases["tiny-rar"] = pretrained.Release("tiny-rar", "generator", gen, "rar-xl", "tiny-vq")
    releases["tiny-vq"] = pretrained.Release("tiny-vq", "tokenizer", "hf://owner/TiTok/vq.bin@main")
    monkeypatch.setattr(pretrained, "RELEASES", releases)

    out = tmp_path / "samples"
    args = ["sample", "--model", "tiny-rar", "--per-class", "1", "--out", str(out), "--temperature", "0.5"]
    assert main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    expected = dataclasses.asdict(rargen.SampleConfig.from_name("rar-xl", temperature=0.5))
    assert meta["sample_config"] == expected  # the paper's preset, the flag overriding it
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (3, 32, 32, 3)
    # The same command again: nothing downloaded, nothing converted.
    requests = fake_hub.count()
    assert main([*args[:-2], "--out", str(tmp_path / "again")]) == 0
    assert fake_hub.count() == requests


def test_evaluate_fetches_the_reference_batch_and_inception_weights(
    fake_hub: FakeHub, tmp_path, monkeypatch, capsys
):
    # Small stand-ins at the official URLs (metrics on real-size Inception features are
    # tested in test_evaluate.py; here the run stops at the samples check, after both fetches).
    buffer = io.BytesIO()
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, buffer)
    weights = buffer.getvalue()
    ref = io.BytesIO()
    np.savez(ref, arr_0=np.zeros((5, 24, 24, 3), dtype=np.uint8))
    releases = dict(pretrained.RELEASES)
    fake_hub.add_plain_file(releases["imagenet256"].source, ref.getvalue())
    fake_hub.add_plain_file(releases["fid-inception"].source, weights)
    # A stand-in cannot have the published digest prefix: the test's release omits it.
    releases["fid-inception"] = dataclasses.replace(releases["fid-inception"], sha256_prefix=None)
    monkeypatch.setattr(pretrained, "RELEASES", releases)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((1, 24, 24, 3), dtype=np.uint8))

    assert main(["evaluate", str(tmp_path / "samples.npz"), "--reference", "imagenet256"]) == 2
    assert "at least 2 images" in capsys.readouterr().err
    gets = sorted(p for m, p, _ in fake_hub.requests if m == "GET")
    assert gets == [
        "/github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "/openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz",
    ]
    files = hub.read_records(hub.cache_settings())["files"]
    assert files[releases["imagenet256"].source]["sha256"] == hashlib.sha256(ref.getvalue()).hexdigest()
    assert files[releases["fid-inception"].source]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert pretrained.resolve("imagenet256", convert=False).read_bytes() == ref.getvalue()
    assert len(fake_hub.requests) == 2  # the second use is served by the verified cache


def test_published_digest_prefix_is_checked(fake_hub: FakeHub) -> None:
    url = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/x.pth"
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    fake_hub.add_plain_file(url, buffer.getvalue())
    with pytest.raises(hub.IntegrityError, match="does not start with the published 6726825d"):
        hub.url_download(url, sha256_prefix="6726825d")
    assert not list((hub.cache_settings().rargen_cache / "files").rglob("x.pth*"))


def test_quickstart_example_runs_against_the_fake_hub(fake_hub: FakeHub, tmp_path, monkeypatch, capsys):
    import runpy

    fake_hub.add_hub_file("owner/RAR", "gen.bin", paired_generator_bin())
    fake_hub.add_hub_file("owner/TiTok", "vq.bin", official_bin("official_vqgan_small"))
    releases = dict(pretrained.RELEASES)
    releases["tiny-rar"] = pretrained.Release(
        "tiny-rar", "generator", "hf://owner/RAR/gen.bin@main", "rar-b", "tiny-vq"
    )
    releases["tiny-vq"] = pretrained.Release("tiny-vq", "tokenizer", "hf://owner/TiTok/vq.bin@main")
    monkeypatch.setattr(pretrained, "RELEASES", releases)
    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    out = tmp_path / "grid.png"
    argv = ["quickstart.py", "--model", "tiny-rar", "--labels", "0,1,2", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert out.is_file() and printed.count("nats/token") == 3
