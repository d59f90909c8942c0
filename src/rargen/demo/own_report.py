"""``report.md`` of ``rargen demo --data``: pictures, scores beside the real-data baselines, budgets
(what was chosen from the data and what was given), expected and measured time per stage."""

from __future__ import annotations

from typing import Any

from rargen.train.recipe import format_duration


def render_own_report(summary: dict[str, Any]) -> str:
    real, generated, budgets = summary["real"], summary["generated"], summary["budgets"]
    tok, train = summary["tokenizer"], budgets["train"]
    names = summary["class_names"]
    kind = "colour" if budgets["image_channels"] == 3 else "grey"
    total_expected = sum(summary["expected_seconds"].values())
    lines = [
        f"# rargen demo on {summary['data']}",
        "",
        f"{budgets['num_train']} training and {budgets['num_heldout']} held-out images (one seeded split for "
        f"every stage: no stage trains on a held-out image), {budgets['num_classes']} classes, {kind}, at "
        f"{budgets['image_size']}x{budgets['image_size']}. Total time "
        f"{format_duration(summary['total_seconds'])} on {summary['threads']} CPU thread(s) (expected about "
        f"{format_duration(total_expected)}).",
        "",
        "![samples](samples.png)",
        "",
        f"Rows are the requested classes ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''}), "
        "columns independent seeds.",
        "",
        "## Scores",
        "",
        "| what | count | class accuracy | Fréchet distance (classifier features, vs held-out) | "
        "held-out NLL (training) | copies |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| real held-out images | {real['num_heldout']} | {real['heldout_accuracy']:.1%} | 0 (reference) "
        "| | |",
        f"| real training images | {real['num_train_compared']} | | {real['train_frechet']:.2f} | | |",
        f"| tokenizer reconstructions of the held-out images | {real['num_heldout']} | "
        f"{real['reconstruction_accuracy']:.1%} | {real['reconstruction_frechet']:.2f} | | |",
        f"| generated | {generated['num_samples']} | {generated['class_accuracy']:.1%} | "
        f"{generated['frechet_distance']:.2f} | {generated['heldout_nll']:.3f} "
        f"({generated['train_nll']:.3f}) bits/token | {generated['copy_fraction']:.1%} |",
        "",
        f"The generated images are recognised as their class {generated['relative_accuracy']:.0%} as often "
        "as real held-out images are. Class accuracy: the fraction the classifier (trained on the "
        "training split only) assigns to the requested class. The tokenizer's reconstructions bound what "
        "any generator on its codes can reach; when they score far below the real images, the tokenizer "
        "limits quality (more tokenizer steps, or a larger codebook). The Fréchet distance compares "
        "classifier features with the held-out images' and is biased upwards by small samples: read the "
        "generated row against the real training row (as many real images that the classifier was trained"
        " on). Held-out NLL: bits per token of the held-out codes in raster order (training NLL beside "
        "it: a large gap is memorisation). Copies: the fraction of samples nearer to a training image "
        "than 95% of the held-out images are (about 5% means no copying).",
        "",
        "## Tokenizer",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        f"Held-out originals over their reconstructions. Held-out PSNR {tok['psnr']:.2f} dB, codebook usage "
        f"{tok['codebook_usage']:.0%}, perplexity {tok['perplexity']:.1f}.",
        "",
        "## Training",
        "",
        "![training](training.png)",
        "",
        "## Budgets",
        "",
        "Chosen from the data (image count, size, colour, classes) where not given as flags; the same "
        "data and settings always give the same budgets.",
        "",
        "| setting | value | |",
        "| --- | --- | --- |",
    ]
    chosen = set(budgets["chosen"])
    rows = [
        ("tokenizer_steps (the cap)", budgets["tokenizer_steps"]),
        ("classifier_epochs (the cap)", budgets["classifier_epochs"]),
        ("train.preset", train["preset"]),
        ("train.steps", train["steps"]),
        ("train.batch_size", train["batch_size"]),
        ("train.lr", train["lr"]),
        ("eval_per_class", budgets["eval_per_class"]),
    ]
    marks = {name: "chosen" if name.split()[0] in chosen else "given" for name, _ in rows}
    lines += [f"| {name} | {value} | {marks[name]} |" for name, value in rows]
    lines += [f"| {name} | {value} | {marks[name]} |" for name, value in rows]
    lines += [
        "",
        "## Timings",
        "",
        "| step | seconds |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in summary["seconds"].items()]
    if summary["skipped"]:
        lines += [
            "",
            f"Skipped {len(summary['skipped'])} unreadable file(s): "
            + ", ".join(item["name"] for item in summary["skipped"][:10]),
        ]
    # Not the command's own settings (their defaults are what the chosen budgets replaced).
    lines += ["", "Every setting as it applied: budgets.json; the command's flags: demo_config.json."]
    return "\n".join(lines) + "\n"
