"""Prepared decoders kept with their model while its weights are unchanged.

Preparing a model for decoding copies its Linear weights (prepacked for oneDNN, or int8): 0.65 s
for RAR-B on a CPU. ``prepare_for_decoding`` keeps what it made here, so a caller sampling in a
loop with a plain model (``generate``, ``token_probs``, ``generate_images``) pays it once.

Where: a ``weakref.WeakKeyDictionary`` keyed by the model object, outside the model, so nothing
is added to the model itself (its ``state_dict``, ``torch.save``, ``copy.deepcopy`` and DDP see
the model as it always was) and an entry goes when its model is collected. A value must not
hold the model itself (it would never be collected): only views are kept, never the model.

Invalidation: an entry is valid while every parameter and buffer of the model is the same
tensor, unchanged: its ``data_ptr``, dtype, device, shape and autograd version counter
(``_version``, bumped by every in-place write made through the tensor: an optimizer step,
``load_state_dict``, ``nn.init``, ``p.copy_`` under ``no_grad``). A new tensor (``model.to``,
``load_state_dict(assign=True)``) changes the pointer, dtype or device. A write through
``p.data`` bypasses the version counter and is NOT seen: call ``release_prepared(model)`` after
one. Checking costs one pass over the parameter list (~1 ms for RAR-B), no read of the weights.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")

_KEPT: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[tuple, Any]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def weights_fingerprint(model: nn.Module) -> tuple | None:
    """What identifies ``model``'s current weights without reading them (see the module
    docstring); None when a tensor has no version counter (made under ``torch.inference_mode``,
    where in-place writes are not counted) or no data pointer: such a model is not kept."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    if any(t.is_inference() or t.is_mkldnn for _, t in tensors):  # mkldnn: opaque, no data pointer
        return None
    return tuple(
        (name, t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), model.training)
        for name, t in tensors
    )


def kept_or_made(model: nn.Module, options: Hashable, make: Callable[[], T], keep: Callable[[T], bool]) -> T:
    """``make()``'s result for ``model`` prepared with ``options``: the one kept from an earlier
    call while the model's weights are unchanged, else made now (and kept when ``keep(it)``).
    Entries of the model made for older weights are dropped on the way (any ``options``)."""
    fingerprint = weights_fingerprint(model)
    if fingerprint is None:
        release_prepared(model)
        return make()
    with _LOCK:
        entries = _KEPT.get(model, {})
        for key in [key for key, (seen, _) in entries.items() if seen != fingerprint]:
            del entries[key]  # stale: its weight copies are freed now, not at the next use
        if options in entries:
            return entries[options][1]
    made = make()
    if keep(made):
        with _LOCK:
            _KEPT.setdefault(model, {})[options] = (fingerprint, made)
    return made


def release_prepared(model: nn.Module) -> None:
    """Forget the decoders kept for ``model`` (frees their weight copies; the next call prepares
    anew). Needed only after writing its weights through ``p.data``, which no check can see."""
    with _LOCK:
        _KEPT.pop(model, None)


def kept_count(model: nn.Module) -> int:
    """How many prepared decoders are kept for ``model`` now."""
    with _LOCK:
        return len(_KEPT.get(model, {}))


__all__ = ["kept_count", "kept_or_made", "release_prepared", "weights_fingerprint"]
