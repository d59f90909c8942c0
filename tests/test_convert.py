"""Official <-> rargen weight conversion: layout round trip, architecture inference, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rargen
from rargen.cli.main import main
from rargen.convert import from_official, infer_official_config, to_official
from rargen.model import RAR, ModelConfig


def test_to_official_layout_matches_spec(tiny_model: RAR) -> None:
    official = to_official(tiny_model)
    # Spec Sec. 6 example config: D 64, depth 2, heads 4, mlp 256, L 16, V 32, C 10 -> 45 tensors.
    assert len(official) == 4 + 18 * 2 + 5
    assert official["pos_embed"].shape == (1, 16 + 1024, 64)
    assert official["target_aware_pos_embed"].shape == (1, 16 + 1024, 64)
    assert official["timesteps_embeddings"].shape == (1, 16 + 100, 64)
    assert official["embeddings.weight"].shape == (32 + 10 + 2, 64)
    assert official["blocks.1.adaLN_modulation.1.weight"].shape == (384, 64)
    assert sum(t.numel() for t in official.values()) == 303_840
    # Never-used rows are zeros; the mask-token row V too.
    assert torch.count_nonzero(official["embeddings.weight"][32]) == 0
    assert torch.count_nonzero(official["target_aware_pos_embed"][0, :2]) == 0


def test_official_round_trip_is_exact(tiny_model: RAR) -> None:
    config, state = from_official(to_official(tiny_model))
    assert config == ModelConfig.from_name("rar-tiny")  # architecture inferred from shapes alone
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name", ["rar-b", "rar-xxl"])
def test_infer_paper_architectures(name: str) -> None:
    config = ModelConfig.from_name(name)
    with torch.device("meta"):
        official = to_official_shapes(RAR(config))
    assert infer_official_config(official) == ModelConfig.from_name(name, dropout=0.1)


def to_official_shapes(model: RAR) -> dict[str, torch.Tensor]:
    cfg = model.config
    V, C, L, D = cfg.codebook_size, cfg.num_classes, cfg.num_image_tokens, cfg.dim
    shapes = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, L + 1024, D),
        "target_aware_pos_embed": (1, L + 1024, D),
        "timesteps_embeddings": (1, L + 100, D),
        "embeddings.weight": (V + C + 2, D),
        "lm_head.weight": (V, D),
    }
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            state[key.replace(".adaln.", ".adaLN_modulation.1.")] = value
    return state


def test_rejects_non_rar_files(tmp_path: Path) -> None:
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an official RAR generator state dict.*encoder.conv_in.weight"):
        main_or_raise(
            ["convert", "official-rar", str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "o")]
        )
    wrapped = {"module." + k: v for k, v in to_official(RAR(ModelConfig.from_name("rar-tiny"))).items()}
    with pytest.raises(ValueError, match="wrapped"):
        infer_official_config(wrapped)


def main_or_raise(argv: list[str]) -> None:
    from rargen.cli.main import build_parser

    args = build_parser().parse_args(argv)
    args.run(args)


def test_cli_round_trip_bin_and_back(tmp_path: Path, tiny_model: RAR, capsys) -> None:
    tiny_model = tiny_model.float()
    torch.save(to_official(tiny_model), tmp_path / "rar_tiny.bin")
    assert (
        main(["convert", "official-rar", str(tmp_path / "rar_tiny.bin"), "--out", str(tmp_path / "g")]) == 0
    )
    # 303,840 official parameters minus the 137,280 never-used rows.
    assert "166,560 parameters" in capsys.readouterr().out
    converted = rargen.load(tmp_path / "g")
    on_the_fly = rargen.load(tmp_path / "rar_tiny.bin")
    tokens, labels = torch.randint(0, 32, (2, 16)), torch.tensor([3, 10])
    expected = tiny_model(tokens, labels)
    assert torch.equal(converted(tokens, labels), expected)
    assert torch.equal(on_the_fly(tokens, labels), expected)
    out = tmp_path / "back.safetensors"
    assert main(["convert", "to-official", str(tmp_path / "g"), "--out", str(out)]) == 0
    official = load_file(str(out))
    for key, value in to_official(tiny_model).items():
        assert torch.equal(official[key], value), key


def test_cli_preset_mismatch(tmp_path: Path, tiny_model: RAR, capsys) -> None:
    torch.save(to_official(tiny_model.float()), tmp_path / "rar_tiny.bin")
    code = main(
        [
            "convert",
            "official-rar",
            str(tmp_path / "rar_tiny.bin"),
            "--out",
            str(tmp_path / "g"),
            "--preset",
            "rar-b",
        ]
    )
    assert code == 2
    assert "dim: file 64 vs preset 768" in capsys.readouterr().err


def test_missing_file_says_where_to_get_it(tmp_path: Path, capsys) -> None:
    assert main(["convert", "official-rar", str(tmp_path / "rar_b.bin"), "--out", str(tmp_path / "g")]) == 2
    assert "yucornetto/RAR" in capsys.readouterr().err
