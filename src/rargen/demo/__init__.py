"""The demo: the one-command pipeline on the embedded digits, the ablation study tool and the digit
classifier that scores them."""
