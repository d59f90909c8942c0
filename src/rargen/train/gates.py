"""Quality gates: train until held-out quality stops improving (within a cap), keep the best
weights, and say in plain words whether the result is good enough and what to change.

A fixed budget was wrong both ways (issue 27): the tokenizer's 300 steps gave a colour folder
16.8 dB (blurry, desaturated samples; 24.6 dB at 1200 steps), the classifier's 12 epochs 73%
held-out accuracy (95.6% at 40), and nothing said so. ``Plateau`` is the stopping rule both
trainers share; ``tokenizer_verdict`` and ``classifier_verdict`` are what their commands print.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Below this held-out PSNR a tokenizer's reconstructions (and so every sample) are visibly blurry
# with colours off: issue 27's colour folder gave blobs at 16.8 dB and recognisable crops at 24.6
# dB; the digits' tokenizer reaches about 34 dB.
PSNR_BAR_DB = 22.0
# Reconstructions should be recognised (by an independent classifier) at least this often relative
# to the real images: below it the codes lose what tells the classes apart, and no generator on
# them can do better.
RECOGNITION_BAR = 0.9
# Held-out accuracy below which a classifier is too weak a scorer: issue 27's 73% scorer showed
# more guidance *lowering* class accuracy where a 95.6% one showed it rising.
ACCURACY_BAR = 0.9


@dataclass
class Plateau:
    """Patience on a held-out metric (higher is better), evaluated every so often.

    Training ends after ``patience`` evaluations (0: never) without a gain of more than
    ``min_gain`` over ``mark``, the value of the last such gain; ``best`` is the highest value seen,
    whose weights are the ones kept. Both trainers measure a log of a held-out error (PSNR is
    -10 log10 MSE; the classifier's is -ln of the validation loss), so ``min_gain`` is relative: a
    gain of 0.1 dB is 2.3% less squared error. The state is a plain dict, saved with a run for an
    exact resume."""

    patience: int
    min_gain: float
    best: float = -math.inf
    best_at: int = 0  # the step (or epoch) of the best value
    mark: float = -math.inf
    since_gain: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, value: float, at: int) -> bool:
        """Record ``value`` measured at ``at``; True when it is the best so far (keep its weights)."""
        self.history.append((at, value))
        if value > self.mark + self.min_gain:
            self.mark, self.since_gain = value, 0
        else:
            self.since_gain += 1
        if value > self.best:
            self.best, self.best_at = value, at
            return True
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.since_gain >= self.patience

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Plateau:
        return cls(**{**state, "history": [tuple(item) for item in state["history"]]})


def gate_report(plateau: Plateau, cap: int) -> dict[str, Any]:
    """The gate's record in a report: the cap, how far training ran, the best step and the history."""
    ran = plateau.history[-1][0] if plateau.history else cap
    return {
        "patience": plateau.patience,
        "cap": cap,
        "ran": ran,
        "best_at": plateau.best_at or ran,
        "stopped_early": plateau.stop,
        "history": plateau.history,
    }


def copy_weights(module: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``module``'s weights (the best so far, kept while training goes on)."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Verdicts


def _stopping(report: dict[str, Any], unit: str) -> str:
    gate = report["gate"]
    if gate["patience"] == 0:
        return f"a fixed budget of {gate['cap']} {unit}s"
    where = f"best at {unit} {gate['best_at']} of {gate['ran']}"
    if gate["stopped_early"]:
        return f"{where}; stopped early: no gain in {gate['patience']} evaluations (cap {gate['cap']})"
    return f"{where}; reached the cap of {gate['cap']} {unit}s"


def tokenizer_verdict(report: dict[str, Any], flag: str = "--steps") -> str:
    """What ``rargen train-tokenizer`` prints: held-out PSNR, recognition, and what to change."""
    psnr, gate = report["heldout"]["psnr"], report["gate"]
    lines = [
        f"tokenizer: held-out PSNR {psnr:.1f} dB on {report['heldout']['num_images']} images "
        f"({_stopping(report, 'step')})"
    ]
    seen = report.get("recognition")
    if seen:
        lines.append(
            f"  the classifier recognises {seen['reconstruction_accuracy']:.1%} of the reconstructions vs "
            f"{seen['real_accuracy']:.1%} of the real held-out images: the ceiling for any generator on "
            "these codes"
        )
    else:
        lines.append(
            "  (give --classifier DIR, from rargen train-classifier, to see how well the reconstructions "
            "are recognised: the ceiling for any generator on these codes)"
        )
    problems = []
    if psnr < PSNR_BAR_DB:
        problems.append(f"PSNR {psnr:.1f} dB is below {PSNR_BAR_DB:.0f} dB: samples will be blurry")
    if seen and seen["relative"] is not None and seen["relative"] < RECOGNITION_BAR:
        problems.append(f"reconstructions are recognised only {seen['relative']:.0%} as often as real images")
    if not problems:
        lines.append("verdict: good enough to pretokenize with")
        return "\n".join(lines)
    if gate["patience"] == 0:
        fix = (
            f"it had a fixed budget (--patience 0): drop --patience 0 to train until it stops improving "
            f"({flag} the cap, e.g. {flag} {2 * gate['cap']}), in a new --out"
        )
    elif not gate["stopped_early"]:
        fix = (
            f"it was still improving at the cap: train longer ({flag} {2 * gate['cap']} --resume), "
            "then, if it levels off low, a larger codebook or a finer grid"
        )
    else:
        size = report["model_config"]["codebook_size"]
        fix = (
            f"it levelled off: a larger codebook (--codebook-size {2 * size}) or a finer grid (one level "
            "fewer in --channel-mult, e.g. 1,2: twice the codes per side), in a new --out"
        )
    lines.append(f"verdict: LOW: {'; '.join(problems)}. To fix: {fix}")
    return "\n".join(lines)


def classifier_verdict(report: dict[str, Any]) -> str:
    """The verdict line of ``rargen train-classifier``: held-out accuracy against the bar."""
    accuracy, gate = report["heldout_accuracy"], report["gate"]
    head = f"verdict ({_stopping(report, 'epoch')}): held-out accuracy {accuracy:.1%}"
    if accuracy >= ACCURACY_BAR:
        return f"{head}: good enough to score samples with"
    if gate["patience"] == 0:
        fix = "a fixed budget (--patience 0): drop that to train until it stops improving (--epochs: the cap)"
    elif not gate["stopped_early"]:
        fix = f"it was still improving at the cap: raise --epochs (e.g. {2 * gate['cap']})"
    else:
        fix = "it levelled off: more images per class, or a wider net (--channels 32,64,64 --feature-dim 128)"
    return (
        f"{head}: LOW (below {ACCURACY_BAR:.0%}): a weak scorer misjudges samples (more guidance "
        f"can even look worse). To fix: {fix}"
    )


def describe_classifier(report: dict[str, Any], out: str | os.PathLike) -> str:
    """The console summary of ``rargen train-classifier``, then its verdict."""
    baseline, names = report["train_vs_heldout_frechet"], report["class_names"]
    summary = (
        f"classifier of {len(names)} classes ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}) "
        f"at {report['image_size']} px, {report['image_channels']} channel(s): held-out accuracy "
        f"{report['heldout_accuracy']:.2%} on {report['num_heldout']} images (train "
        f"{report['train_accuracy']:.2%} on {report['num_train']}); Fréchet distance train vs held-out "
        f"{'n/a' if baseline is None else f'{baseline:.4g}'} (real data: a baseline for samples); "
        f"{report['seconds']:.0f} s; saved to {out}"
    )
    return f"{summary}\n{classifier_verdict(report)}"
