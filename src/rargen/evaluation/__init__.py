"""Evaluation: the FID Inception network, ADM-compatible metrics, ``rargen evaluate``, guidance sweeps
and the classifier that scores samples of your own data. A new metric goes here."""
