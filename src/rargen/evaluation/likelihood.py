"""How likely a generator finds a token store's images: bits per token in raster order.

The held-out NLL is the generator's honest quality number that needs no sampling; the training NLL
beside it shows memorisation (far below the held-out one: the model learnt its images by heart).
``rargen train`` reports both at the end of a run when its store has a held-out store beside it
(``pretokenize`` writes STORE-heldout, the other side of the split: ``heldout_store_of``); the demo
and ``rargen ablate`` report them per checkpoint (``rargen.demo.ablation.Evaluator``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rargen.data.split import check_same_split
from rargen.data.token_store import META_NAME, TokenStore

# `rargen train` scores at most this many images of each store (evenly spaced): seconds on a GPU,
# and a standard error far below the differences that matter.
MAX_NLL_IMAGES = 2000


def store_tokens(path: str | os.PathLike, max_images: int | None = None) -> tuple[Tensor, Tensor]:
    """Images of a store in their first variant: tokens (N, L) int64 and labels (N,) int64; at most
    ``max_images`` of them, evenly spaced through the store, when given."""
    store = TokenStore(path)
    index = np.arange(len(store))
    if max_images is not None and len(store) > max_images:
        index = np.linspace(0, len(store) - 1, max_images).round().astype(np.int64)
    tokens = store.gather(index, np.zeros_like(index)).reshape(len(index), -1)
    labels = store.labels[index]
    return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def raster_nll_bits(model: Any, tokens: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Mean negative log-likelihood of ``tokens`` (N, L) given their labels, raster order, in bits
    per token, through ``model``'s teacher-forced forward (in eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(device)
        logits = model(batch, labels[start : start + batch_size].to(device))
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.flatten(),
                                                         reduction="sum"))  # fmt: skip
    model.train(was_training)
    return total / tokens.numel() / math.log(2)


def _split_of(store: Path) -> dict[str, Any] | None:
    meta = store / META_NAME
    return json.loads(meta.read_text()).get("split") if meta.is_file() else None


def refuse_heldout_store(store: str | os.PathLike) -> None:
    """Refuse to train on a held-out store (``pretokenize``'s STORE-heldout): no command trains on
    held-out images."""
    split = _split_of(Path(store))
    if split and split.get("part") == "heldout":
        raise ValueError(
            f"{str(store)!r} holds the held-out images of a split (pretokenize wrote it beside the training "
            "store); train on the training store, the --out you gave pretokenize"
        )


def heldout_store_of(store: str | os.PathLike) -> Path | None:
    """The held-out store ``pretokenize`` wrote beside ``store`` (named in its meta.json's split),
    checked to hold the other side of the same split; None for a store written without a split."""
    store = Path(store)
    split = _split_of(store)
    if not split or split.get("part") != "train":
        return None
    heldout = store.parent / split["heldout_store"]
    if not (heldout / META_NAME).is_file():
        raise FileNotFoundError(
            f"{str(store)!r} has its held-out images in {str(heldout)!r}, which is missing or unfinished; "
            "rerun the same pretokenize command"
        )
    other = _split_of(heldout)
    check_same_split(split, f"the store {str(store)!r}", other, f"the held-out store {str(heldout)!r}")
    if not other or other.get("part") != "heldout":
        raise ValueError(
            f"{str(heldout)!r} is not the held-out side of {str(store)!r}'s split; rerun pretokenize"
        )
    return heldout


def heldout_nll(checkpoint: str | os.PathLike, store: str | os.PathLike) -> dict[str, Any] | None:
    """Held-out and training NLL (bits per token, raster order, at most ``MAX_NLL_IMAGES`` each) of
    a generator checkpoint on ``store`` and its held-out store; None when it has none. Written to
    ``heldout_nll.json`` beside the checkpoint folder (the run folder)."""
    from rargen.checkpoint import load
    from rargen.distributed import default_device

    heldout = heldout_store_of(store)
    if heldout is None:
        return None
    model = load(checkpoint, device=default_device("auto")).eval()
    result: dict[str, Any] = {"heldout_store": str(heldout), "store": str(store)}
    for name, path in (("heldout", heldout), ("train", store)):
        tokens, labels = store_tokens(path, MAX_NLL_IMAGES)
        result[f"{name}_nll"], result[f"num_{name}_images"] = (
            raster_nll_bits(model, tokens, labels),
            len(tokens),
        )
    (Path(checkpoint).parent / "heldout_nll.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def describe_training(config: Any, final: str | os.PathLike, store: str | os.PathLike) -> str:
    """``rargen train``'s last words: what was trained and where, and (on the main process, when
    the store has a held-out store) the held-out and training NLL of the final weights."""
    from rargen.distributed import is_main_process

    line = f"trained {config.preset} for {config.steps} steps; final weights in {final}"
    result = heldout_nll(final, store) if is_main_process() else None
    if result is None:
        return line
    return line + "\n" + describe_nll(result) + ", also in heldout_nll.json"


# A training NLL this much (relative) below the held-out one is called memorisation: the digits
# demo's models sit within a few percent; issue 27's colour folder, trained 120 epochs on 641
# images, reached 0.87 bits/token on its training codes against 5.63 held out.
MEMORISATION_GAP = 0.1


def describe_nll(result: dict[str, Any]) -> str:
    """Held-out and training NLL, and whether their gap says the model learnt its images by heart."""
    heldout, train = result["heldout_nll"], result["train_nll"]
    gap = heldout - train
    if gap > MEMORISATION_GAP * heldout:
        verdict = f"{gap:.3f} lower on the training images: memorisation (fewer steps or more images)"
    else:
        verdict = f"within {MEMORISATION_GAP:.0%} of the held-out NLL: no sign of memorisation"
    return (
        f"held-out NLL {heldout:.3f} bits/token on {result['num_heldout_images']} held-out images "
        f"(training {train:.3f} on {result['num_train_images']}, {verdict})"
    )
