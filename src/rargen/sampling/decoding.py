"""The decoding batch: slots of one static KV cache, each row at its own position.

``prepare_for_decoding(model, bf16=..., compile=...)`` is the one place that decides how a model
decodes: weights prepacked for oneDNN on CPUs (``rargen.sampling.cpu``), the step compiled by
Inductor with frozen weights on CPUs (``rargen.sampling.compiled_cpu``), or the fixed-shape step
compiled (CUDA graphs on GPU). It runs once per model and weights (the decoder is kept with the
model, ``rargen.sampling.prepared``); the loop never packs.

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

Any order: a row may be added with its own generation order (a permutation of the image
positions) and with a prefix of its tokens given in that order (inpainting: the known tokens
first), fed in one windowed pass right after the prefill. Only the inputs depend on the order
(the fed token's position embedding and its target's target-aware embedding); the cache, the
attention and the adaLN conditioning are indexed by the sequence index, as in ``RAR.forward``.
A batch holds an order table only while one of its rows is not raster, so raster batches step
exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rargen.kv_cache import CacheAt, CacheWindow, KVCache, cache_mask
from rargen.model import RAR
from rargen.orders import raster_orders
from rargen.sampling.compiled_cpu import EAGER_FROM_ROWS, CompiledCpuStep
from rargen.sampling.cpu import is_packed, packed_for_cpu_decoding
from rargen.sampling.prepared import kept_or_made

# Budget for the adaLN modulations computed ahead (all tables of one batch together).
MODULATION_CHUNK_BYTES = 128 * 2**20


def decode_fixed_shapes(
    model: RAR,
    tokens: Tensor,
    labels: Tensor,
    positions: Tensor,
    cache: KVCache,
    image_positions: Tensor | None = None,
) -> Tensor:
    """One step with the modulations computed inside and a masked full-length cache: the same
    shapes at every step (for ``torch.compile`` and CUDA graphs). ``image_positions``: see
    ``RAR.decode_inputs`` (None, the raster step, compiles to the graph it always had)."""
    modulation = model.decode_modulations(labels, positions)
    at = CacheAt(positions, mask=cache_mask(positions, model.config.num_image_tokens + 1))
    return model.decode_step(tokens, modulation, cache, at, image_positions)


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

    model: RAR  # the model itself (compiled on GPU), a view of it (CPU: oneDNN-packed, int8, compiled)
    compiled: bool = False
    quantize: str | None = None  # "int8": an int8 view (rargen.sampling.int8), inexact
    cpu_step: CompiledCpuStep | None = None  # compiled on a CPU: the step (rargen.sampling.compiled_cpu)

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
    model with ``model.to(torch.bfloat16)`` first. ``compile`` compiles the step: on a CPU one
    Inductor program with frozen weights (``rargen.sampling.compiled_cpu``: compiled and
    autotuned at the first step of each row bucket, minutes for RAR-B; float32 steps of 16 rows
    or more run the eager oneDNN step, measured faster there), elsewhere the fixed-shape
    step (CUDA graphs on GPU; one graph per batch size). Otherwise, on a CPU, the Linear weights are
    prepacked for oneDNN (a view sharing every other parameter). ``quantize="int8"`` (CPU,
    float32) multiplies the per-step Linears with int8 weights (``rargen.sampling.int8``):
    faster, and not exact. ``model`` is left untouched either way. The decoder made is kept for
    the next call with the same model and options while the model's weights are unchanged (an
    optimizer step, ``load_state_dict`` or ``model.to`` makes a new one; see
    ``rargen.sampling.prepared``), so calling this, or ``generate`` with a plain model, in a
    loop prepares once.
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
    if quantize is not None and (compile or bf16):
        raise ValueError("quantize='int8' runs eager float32 on a CPU: drop compile and bf16")
    if compile and model.device.type != "cpu":
        return Decoder(model, compiled=True)
    if compile:

        def compiled() -> Decoder:
            step = CompiledCpuStep(model)
            # The eager parts (prefills, and the row buckets left to eager: EAGER_FROM_ROWS) run
            # on the oneDNN-packed view where some bucket is left to eager.
            eager = packed_for_cpu_decoding(model) if model.dtype in EAGER_FROM_ROWS else step.model
            return Decoder(eager, compiled=True, cpu_step=step)

        return kept_or_made(model, "compiled", compiled, keep=lambda decoder: True)

    def make() -> Decoder:
        if quantize is None:
            return Decoder(packed_for_cpu_decoding(model))
        from rargen.sampling.int8 import quantized_for_decoding

        return Decoder(quantized_for_decoding(model, quantize), quantize=quantize)

    # Kept with the model while its weights are unchanged (rargen.sampling.prepared); a decoder
    # that is the model itself (nothing copied: not a CPU, float64, ...) is free to remake.
    return kept_or_made(model, quantize, make, keep=lambda decoder: decoder.model is not model)


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
        self._cpu_step = decoder.cpu_step
        self._step = _compiled_step(model.device) if self.compiled and self._cpu_step is None else None
        # Each row's generation order (rows, L), made when a row in another order joins and
        # dropped when the last one leaves; ``ordered`` marks those rows (raster rows hold arange).
        self._orders: Tensor | None = None
        self.ordered: list[bool] = []

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def free(self) -> int:
        return self.capacity - len(self.labels)

    def add(
        self,
        labels: Sequence[int],
        orders: Tensor | None = None,
        known: Tensor | None = None,
        counts: Sequence[int] | None = None,
    ) -> tuple[list[int], Tensor]:
        """Start rows for ``labels`` (the null label for an unconditional row): their cls and
        class positions run into free slots now (the prefill, one pass for these rows only).
        Returns their slots and the logits (k, V) of their first token to draw; they feed it
        (``feed``) at the next step, beside the rows already decoding.

        ``orders`` (k, L) int64: each row's generation order (None: raster). ``known`` (k, L)
        int64 tokens in that order, of which row ``i``'s first ``counts[i]`` (< L) are given: they
        are fed now too, in one windowed pass, and the logits returned are those of the row's token
        ``counts[i]`` in its order (``RAR.forward``'s output ``counts[i]`` for that order)."""
        labels = [int(label) for label in labels]
        k, L = len(labels), self.model.config.num_image_tokens
        if k > self.free:
            raise ValueError(f"{k} rows do not fit: {self.free} of {self.capacity} slots are free")
        first = len(self.labels)
        device = self.model.device
        if orders is not None and self._orders is None:  # the first row in another order
            self._orders = raster_orders(self.capacity, L, device)
        if self._orders is not None:  # raster rows too: a slot may hold a departed row's order
            self._orders[first : first + k] = raster_orders(k, L, device) if orders is None else orders
        targets = None if orders is None else orders[:, 0]
        logits = self.model.prefill(torch.tensor(labels, device=device), self.cache, first, targets)
        self.labels += labels
        self.positions += [2] * k
        self.ordered += [orders is not None] * k
        self._positions[first : first + k] = 2
        self._labels_tensor = None
        if counts is not None and any(counts):
            logits = self._feed_known(first, known, [int(c) for c in counts], logits)
        return list(range(first, first + k)), logits

    def _feed_known(self, first: int, known: Tensor, counts: list[int], logits: Tensor) -> Tensor:
        """Feed new row ``first + i`` its first ``counts[i]`` tokens of ``known`` at sequence
        indices 2 .. counts[i] + 1, all rows in one pass (a causal window per group of rows with
        equal counts, as a speculative pass). Returns ``logits`` with each such row's replaced by
        its window's last output: the distribution of its token ``counts[i]``."""
        L, device = self.model.config.num_image_tokens, self.model.device
        if max(counts) >= L:
            raise ValueError(f"a row may be given at most {L - 1} tokens of {L}, got {max(counts)}")
        groups: dict[int, list[int]] = {}
        for i, count in enumerate(counts):
            if count:
                groups.setdefault(count, []).append(i)
        windows, tokens, sequence, rows, image, modulations = [], [], [], [], [], []
        for count, members in sorted(groups.items()):
            index = torch.tensor(members, device=device)
            cache_rows = first + index
            windows.append(CacheWindow.causal(cache_rows, 2, count))
            tokens.append(known[index, :count].flatten())
            sequence.append(torch.arange(2, 2 + count, device=device).repeat(len(members)))
            rows.append(cache_rows.repeat_interleave(count))
            if self._orders is not None:  # fed token i at order[i], its target order[i + 1]
                order = self._orders[cache_rows]
                image.append(torch.stack([order[:, :count], order[:, 1 : count + 1]], -1).flatten(0, 1))
            # One table per label of the group (rows with a label share it), gathered per row.
            labels, inverse = torch.tensor([self.labels[r] for r in cache_rows.tolist()]).unique(
                return_inverse=True
            )
            spans = torch.stack([self.modulations.span(label, 2, count) for label in labels.tolist()])
            modulations.append(spans[inverse.to(device)].flatten(0, 1))
        at = CacheAt(torch.cat(sequence), windows=tuple(windows), slots=torch.cat(rows))
        out = self.model.decode_step(
            torch.cat(tokens), torch.cat(modulations), self.cache, at, torch.cat(image) if image else None
        )
        logits, start = logits.clone(), 0
        for count, members in sorted(groups.items()):
            stop = start + count * len(members)
            logits[members] = out[start:stop].view(len(members), count, -1)[:, -1]
            start = stop
        for i, count in enumerate(counts):
            self.positions[first + i] += count
        self._positions[first : first + len(counts)] += torch.tensor(counts, device=device)
        return logits

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
                self.ordered[hole] = self.ordered[last]
                if self._orders is not None:
                    self._orders[hole] = self._orders[last]
                where[hole], current[moved] = moved, hole
            self.labels.pop()
            self.positions.pop()
            self.ordered.pop()
            where.pop()
        if not any(self.ordered):  # every row left is raster: steps as a raster batch again
            self._orders = None
        for original, now in current.items():
            if original != now:
                moves.append((original, now))
        self._labels_tensor = None
        return moves

    @property
    def raster(self) -> bool:
        """Whether every live row decodes in raster order (no order table)."""
        return self._orders is None

    def feed_windows(self, lengths: Sequence[int], drafts: Tensor) -> Tensor:
        """A speculative pass: live row ``i`` feeds ``lengths[i]`` >= 1 consecutive positions from
        its position, its ``feed`` token then ``drafts[i, : lengths[i] - 1]`` (drafts (n, >= max
        length - 1) int64), each position attending causally to the row's own prefix. Returns
        logits (sum(lengths), V), row by row and in each row position by position. Positions do
        not move (``advance`` moves each row by the positions it keeps; the cache entries past
        them are rewritten by the next pass before any row reads them). Raster rows only."""
        n, device = len(self.labels), self.model.device
        if len(lengths) != n or self._orders is not None:
            raise ValueError(f"feed_windows takes one length per live row ({n}) of a raster batch")
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        groups: dict[tuple[int, int], list[int]] = {}  # rows at one position with one length: a window
        for row, (position, length) in enumerate(zip(self.positions, lengths, strict=True)):
            groups.setdefault((position, length), []).append(row)
        tables = self.modulations
        needed = {(self.labels[r], p + w) for (p, k), rows in groups.items() for r in rows for w in range(k)}
        tables.keep({tables.key(label, position) for label, position in needed})
        windows, tokens, sequence, slots, modulations, order = [], [], [], [], [], []
        for (position, length), rows in groups.items():
            index = torch.tensor(rows, device=device)
            windows.append(CacheWindow.causal(index, position, length))
            tokens.append(torch.cat([self.feed[index, None], drafts[index, : length - 1]], 1).flatten())
            sequence.append(torch.arange(position, position + length, device=device).repeat(len(rows)))
            slots.append(index.repeat_interleave(length))
            modulations += [tables.span(self.labels[r], position, length) for r in rows]
            order += [starts[r] + w for r in rows for w in range(length)]
        at = CacheAt(torch.cat(sequence), windows=tuple(windows), slots=torch.cat(slots))
        out = self.model.decode_step(torch.cat(tokens), torch.cat(modulations), self.cache, at)
        logits = torch.empty_like(out)
        logits[torch.tensor(order, device=device)] = out
        return logits

    def advance(self, counts: Sequence[int]) -> None:
        """Move live row ``i`` on by ``counts[i]`` positions (the positions of a speculative pass
        it keeps); its next fed token is the caller's (``feed``)."""
        n = len(self.labels)
        self.positions = [p + int(c) for p, c in zip(self.positions, counts, strict=True)]
        self._positions[:n] += torch.tensor(list(counts), dtype=torch.int64, device=self.model.device)

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
        row's next token (row ``i`` at sequence index ``s`` predicts its token ``s - 1`` in its order).
        Every position advances by one."""
        n = len(self.labels)
        if n == 0:
            raise ValueError("the decoding batch has no live rows")
        if max(self.positions) > self.model.config.num_image_tokens:
            raise ValueError("a row is past the last token; remove finished rows before stepping")
        positions, tokens = self._positions[:n], self.feed[:n]
        image_positions = None
        if self._orders is not None:  # a row in another order: each row's fed and target positions
            image_positions = self._orders[:n].gather(1, torch.stack([positions - 2, positions - 1], 1))
        if self._step is not None:
            if self._labels_tensor is None:
                self._labels_tensor = torch.tensor(self.labels, device=self.model.device)
            extra = () if image_positions is None else (image_positions,)  # raster: the same call as ever
            logits = self._step(self.model, tokens, self._labels_tensor, positions, self.cache, *extra)
        elif self._cpu_step is not None and self._cpu_step.compiles(n, self.capacity):
            logits = self._cpu_step(
                tokens, self._modulations(), positions, self.cache, max(self.positions), image_positions
            )
        else:
            modulation = self._modulations()
            at = CacheAt(positions, runs=self.runs(), slots=self._slots[:n])
            logits = self.model.decode_step(tokens, modulation, self.cache, at, image_positions)
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
