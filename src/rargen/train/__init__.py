"""Training: the generator's loop and recipe, the tokenizer's trainer, and the saved state of a run."""
