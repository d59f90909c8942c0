"""rargen: Randomized AutoRegressive visual generation (RAR, Yu et al. 2024, arXiv 2411.00776).

Importing rargen has no side effects: no network, no global torch flags, no patching.
"""

from rargen.checkpoint import load, save

__version__ = "0.1.0"

__all__ = ["__version__", "load", "save"]
