"""The decoding batch: slots of one static KV cache, each row at its own position.

``prepare_for_decoding(model, bf16=..., compile=...)`` is the one place that decides how a model
decodes: weights prepacked for oneDNN on CPUs (``rargen.sampling.cpu``), or the fixed-shape step
compiled (CUDA graphs on GPU). It runs once per model; the loop never packs.

A ``DecodeBatch`` owns the cache and, per row (slot), a class label and a position: the sequence
index the row feeds next (``s >= 2``: image token ``s - 2``). Rows are added into free slots
(their cls and class positions prefilled at once) and removed when done while the others keep
decoding; every ``step`` feeds one token per row and returns the logits of each row's next token
(gpt-fast's one-token step, with per-row positions). Attention reads each row's own
prefix: rows at equal positions (a request's images, a ``generate`` batch) share one attention
call with exactly that prefix length and no mask, so a row's numbers do not depend on the rows
decoding beside it.

adaLN ahead: a row's conditioning (class + sequence index) is known for all future positions, so
the modulations of ``chunk`` consecutive positions of a label are computed in one batched
product and kept while a row needs them (tables keyed by (label, position // chunk); rows at
different positions simply use different tables). No step reads the adaLN weights otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rargen.kv_cache import CacheAt, KVCache, cache_mask
from rargen.model import RAR
from rargen.sampling.cpu import is_packed, packed_for_cpu_decoding

# Budget for the adaLN modulations computed ahead (all tables of one batch together).
MODULATION_CHUNK_BYTES = 128 * 2**20


def decode_fixed_shapes(
    model: RAR, tokens: Tensor, labels: Tensor, positions: Tensor, cache: KVCache
) -> Tensor:
    """One step with the modulations computed inside and a masked full-length cache: the same
    shapes at every step (for ``torch.compile`` and CUDA graphs)."""
    modulation = model.decode_modulations(labels, positions)
    at = CacheAt(positions, mask=cache_mask(positions, model.config.num_image_tokens + 1))
    return model.decode_step(tokens, modulation, cache, at)


_COMPILED: dict[str, Callable] = {}


def _compiled_step(device: torch.device) -> Callable:
    mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPU
    key = str(mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(decode_fixed_shapes, fullgraph=True, mode=mode, dynamic=False)
    return _COMPILED[key]


@dataclass(frozen=True)
class Decoder:
    """A model prepared for decoding (``prepare_for_decoding``): what every sampler runs."""

    model: RAR  # the model itself (compiled) or its oneDNN-packed view (CPU eager)
    compiled: bool = False
    quantize: str | None = None  # "int8": an int8 view (rargen.sampling.int8), inexact

    @property
    def config(self):
        """The model's ``ModelConfig`` (so code written for a RAR reads a decoder alike)."""
        return self.model.config

    def modulation_chunk(self, conditions: int) -> int:
        """Positions per modulation table so that ``conditions`` tables fit the budget."""
        cfg = self.model.config
        row_bytes = max(1, conditions) * (6 * cfg.depth + 2) * cfg.dim * self.model.dtype.itemsize
        return max(1, min(cfg.num_image_tokens + 1, MODULATION_CHUNK_BYTES // row_bytes))


def prepare_for_decoding(
    model: RAR | Decoder, *, bf16: bool = False, compile: bool = False, quantize: str | None = None
) -> Decoder:
    """Prepare ``model`` once for decoding; the result is what ``generate`` and the server take.

    ``bf16`` runs a bf16 model (weights, activations and cache; guidance in float32): convert the
    model with ``model.to(torch.bfloat16)`` first. ``compile`` compiles the fixed-shape step
    (CUDA graphs on GPU; one graph per batch size). Otherwise, on a CPU, the Linear weights are
    prepacked for oneDNN (a view sharing every other parameter; take a new one after the weights
    change). ``quantize="int8"`` (CPU, float32) multiplies the per-step Linears with int8
    weights (``rargen.sampling.int8``): faster, and not exact. ``model`` is left untouched either way.
    """
    if isinstance(model, Decoder):
        if compile and not model.compiled:
            raise ValueError("compile=True needs the model itself, not a model prepared without compile")
        if quantize is not None and quantize != model.quantize:  # None: as prepared
            raise ValueError(
                f"quantize={quantize!r} differs from the prepared decoder's ({model.quantize!r}); "
                "prepare the model itself with the quantize wanted"
            )
        return model
    if not isinstance(model, RAR):
        raise ValueError(f"prepare_for_decoding takes a RAR generator, got {type(model).__name__}")
    if compile and is_packed(model):
        raise ValueError("compile=True needs the model itself, not a packed_for_cpu_decoding view")
    if model.training:
        raise ValueError("the model is in training mode (dropout on); call model.eval() before sampling")
    if bf16 and model.dtype != torch.bfloat16:
        raise ValueError("bf16=True needs bf16 weights: call model.to(torch.bfloat16) first")
    if quantize is not None:
        if compile or bf16:
            raise ValueError("quantize='int8' runs eager float32 on a CPU: drop compile and bf16")
        from rargen.sampling.int8 import quantized_for_decoding

        return Decoder(quantized_for_decoding(model, quantize), quantize=quantize)
    if compile:
        return Decoder(model, compiled=True)
    return Decoder(packed_for_cpu_decoding(model))


class ModulationTables:
    """adaLN modulations of (label, sequence index) pairs, computed ahead.

    A table holds ``chunk`` consecutive sequence indices of one label (key ``(label, index)``:
    indices ``index * chunk ..``, from 2, the first decoded, to L); every table missing at a call
    is computed in one batched product (``RAR.decode_modulations``) and kept until ``keep`` drops
    it. What a ``DecodeBatch`` step and a speculative window read instead of the adaLN weights.
    """

    def __init__(self, model: RAR, chunk: int) -> None:
        self.model, self.chunk = model, chunk
        self.tables: dict[tuple[int, int], Tensor] = {}

    def key(self, label: int, position: int) -> tuple[int, int]:
        return (label, position // self.chunk)

    def keep(self, keys: set[tuple[int, int]]) -> None:
        """Drop every table not in ``keys`` (no row needs it any more: rows only move forward)."""
        for key in [key for key in self.tables if key not in keys]:
            del self.tables[key]

    def prepare(self, keys: Iterable[tuple[int, int]]) -> None:
        """Compute the tables of ``keys`` not computed yet, all in one batched product."""
        missing = sorted(key for key in set(keys) if key not in self.tables)
        if not missing:
            return
        chunk, last = self.chunk, self.model.config.num_image_tokens
        labels, positions, sizes = [], [], []
        for label, index in missing:
            span = range(max(2, index * chunk), min((index + 1) * chunk, last + 1))
            labels += [label] * len(span)
            positions += list(span)
            sizes.append(len(span))
        device = self.model.device
        tables = self.model.decode_modulations(
            torch.tensor(labels, device=device), torch.tensor(positions, device=device)
        )
        self.tables.update(zip(missing, tables.split(sizes), strict=True))

    def rows(self, labels: Sequence[int], positions: Sequence[int]) -> Tensor:
        """Modulations (n, 6 * depth + 2, D) of the pairs ``(labels[i], positions[i])``."""
        chunk = self.chunk
        self.prepare(self.key(label, position) for label, position in zip(labels, positions, strict=True))
        return torch.stack(
            [
                self.tables[(label, position // chunk)][position - max(2, position // chunk * chunk)]
                for label, position in zip(labels, positions, strict=True)
            ]
        )

    def span(self, label: int, first: int, length: int) -> Tensor:
        """Modulations (length, 6 * depth + 2, D) of ``label`` at sequence indices ``first ..``."""
        chunk, stop = self.chunk, first + length
        indices = range(first // chunk, (stop - 1) // chunk + 1)
        self.prepare((label, index) for index in indices)
        parts = []
        for index in indices:
            start = max(2, index * chunk)
            parts.append(
                self.tables[(label, index)][
                    max(first, start) - start : min(stop, (index + 1) * chunk) - start
                ]
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class DecodeBatch:
    """Rows decoding together in one static KV cache; rows 0 .. ``len(self) - 1`` are live.

    ``feed`` (rows,) int64 holds the token each row feeds at its next step (the caller writes it
    after sampling). ``conditions`` (distinct labels expected at once) sizes the modulation
    chunk; by default every row may have its own.
    """

    def __init__(self, decoder: Decoder, rows: int, conditions: int | None = None) -> None:
        if rows < 1:
            raise ValueError(f"a decoding batch needs at least one row, got {rows}")
        model = self.model = decoder.model
        self.compiled = decoder.compiled
        self.capacity = rows
        self.cache = KVCache(model.config, rows, model.dtype, model.device)
        self.feed = torch.zeros(rows, dtype=torch.int64, device=model.device)
        self.labels: list[int] = []
        # Each row's position twice: on the host for planning a step (runs, modulation tables), and
        # on the device for the step itself, kept in step by arithmetic there: no step copies a
        # list of positions to the device.
        self.positions: list[int] = []
        self._positions = torch.zeros(rows, dtype=torch.int64, device=model.device)
        self._slots = torch.arange(rows, device=model.device)  # entry i of a step writes slot i
        self.modulations = ModulationTables(
            model, decoder.modulation_chunk(rows if conditions is None else conditions)
        )
        self._labels_tensor: Tensor | None = None
        self._step = _compiled_step(model.device) if self.compiled else None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def free(self) -> int:
        return self.capacity - len(self.labels)

    def add(self, labels: Sequence[int]) -> tuple[list[int], Tensor]:
        """Start rows for ``labels`` (the null label for an unconditional row): their cls and
        class positions run into free slots now (the prefill, one pass for these rows only).
        Returns their slots and the logits (k, V) of their token 0; they feed token 0 (``feed``)
        at the next step, beside the rows already decoding."""
        labels = [int(label) for label in labels]
        if len(labels) > self.free:
            raise ValueError(f"{len(labels)} rows do not fit: {self.free} of {self.capacity} slots are free")
        first = len(self.labels)
        device = self.model.device
        logits = self.model.prefill(torch.tensor(labels, device=device), self.cache, first)
        self.labels += labels
        self.positions += [2] * len(labels)
        self._positions[first : first + len(labels)] = 2
        self._labels_tensor = None
        return list(range(first, first + len(labels))), logits

    def remove(self, slots: Sequence[int]) -> list[tuple[int, int]]:
        """Free ``slots`` at once; the last live rows move into the holes (their cache rows are
        copied). Returns the moves ``(old slot, new slot)`` so owners can follow their rows."""
        moves: list[tuple[int, int]] = []
        current = {slot: slot for slot in range(len(self.labels))}  # where each original slot is now
        where = list(range(len(self.labels)))  # original slot at each position
        for slot in sorted(set(slots), reverse=True):
            hole, last = current.pop(slot), len(self.labels) - 1
            if hole != last:
                moved = where[last]
                self.cache.move_row(last, hole, self.positions[last])
                self.feed[hole] = self.feed[last]
                self._positions[hole] = self._positions[last]
                self.labels[hole], self.positions[hole] = self.labels[last], self.positions[last]
                where[hole], current[moved] = moved, hole
            self.labels.pop()
            self.positions.pop()
            where.pop()
        for original, now in current.items():
            if original != now:
                moves.append((original, now))
        self._labels_tensor = None
        return moves

    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """Spans (start, stop, position) of consecutive live rows at the same position."""
        spans: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(self.positions) + 1):
            if i == len(self.positions) or self.positions[i] != self.positions[start]:
                spans.append((start, i, self.positions[start]))
                start = i
        return tuple(spans)

    def _modulations(self) -> Tensor:
        """Each live row's modulation (n, 6 * depth + 2, D), from tables computed ahead."""
        tables = self.modulations
        tables.keep(
            {tables.key(label, position) for label, position in zip(self.labels, self.positions, strict=True)}
        )
        return tables.rows(self.labels, self.positions)

    def step(self) -> Tensor:
        """Feed one position per live row (``feed`` for image tokens); logits (n, V) of each
        row's next token (row ``i`` at sequence index ``s`` predicts raster token ``s - 1``).
        Every position advances by one."""
        n = len(self.labels)
        if n == 0:
            raise ValueError("the decoding batch has no live rows")
        if max(self.positions) > self.model.config.num_image_tokens:
            raise ValueError("a row is past the last token; remove finished rows before stepping")
        positions, tokens = self._positions[:n], self.feed[:n]
        if self._step is not None:
            if self._labels_tensor is None:
                self._labels_tensor = torch.tensor(self.labels, device=self.model.device)
            logits = self._step(self.model, tokens, self._labels_tensor, positions, self.cache)
        else:
            modulation = self._modulations()
            at = CacheAt(positions, runs=self.runs(), slots=self._slots[:n])
            logits = self.model.decode_step(tokens, modulation, self.cache, at)
        self._positions[:n] += 1
        self.positions = [position + 1 for position in self.positions]
        return logits


__all__ = [
    "MODULATION_CHUNK_BYTES",
    "DecodeBatch",
    "Decoder",
    "ModulationTables",
    "decode_fixed_shapes",
    "prepare_for_decoding",
]
