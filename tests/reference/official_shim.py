"""Import the official RAR / MaskGIT-VQGAN modules from an extracted source tree, without their heavy deps.

Used only by the reference-data generators in this folder (never by the library or the test suite).
The official `modeling/__init__.py` and `modeling/modules/__init__.py` pull in torchvision, LPIPS and
diffusion code; `modeling/rar.py` itself needs only torch, numpy and `timm.layers.Mlp`. So we register
`modeling` and `modeling.modules` as bare namespace packages pointing at the extracted folders, load
`modeling.modules.base_model` (for `BaseModel`), and provide a stand-in for timm's `Mlp`.

No official code lives here: the caller passes the path of a tree extracted from the official
repository (see tests/data/README.md), and the modules are imported from that path at run time.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch
from torch import nn


class MlpStandIn(nn.Module):
    """Same submodules, order and parameter names as timm's `Mlp` for the arguments RAR passes."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        **unused: object,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = act_layer()  # nn.GELU() defaults to the exact erf form, as timm uses it
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=True)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


def _namespace(name: str, folder: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module
    return module


def import_official(root: str | Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Return the official `modeling.rar` and `modeling.modules.maskgit_vqgan` modules from `root`."""
    root = Path(root).resolve()
    if not (root / "modeling" / "rar.py").is_file():
        raise ValueError(
            f"--official {root} does not contain modeling/rar.py; extract the official tree first "
            "(git archive HEAD -- modeling utils configs demo_util.py | tar -x -C DIR)"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

    timm = types.ModuleType("timm")
    timm_layers = types.ModuleType("timm.layers")
    timm_layers.Mlp = MlpStandIn
    timm.layers = timm_layers
    sys.modules["timm"] = timm
    sys.modules["timm.layers"] = timm_layers

    modeling = _namespace("modeling", root / "modeling")
    modules = _namespace("modeling.modules", root / "modeling" / "modules")
    modeling.modules = modules
    base_model = importlib.import_module("modeling.modules.base_model")
    modules.BaseModel = base_model.BaseModel

    rar = importlib.import_module("modeling.rar")
    maskgit_vqgan = importlib.import_module("modeling.modules.maskgit_vqgan")
    return rar, maskgit_vqgan


def official_commit(root: str | Path) -> str:
    """The snapshot commit recorded next to the extracted tree (file COMMIT), or 'unknown'."""
    marker = Path(root) / "COMMIT"
    return marker.read_text().strip() if marker.is_file() else "unknown"
