"""rargen: Randomized AutoRegressive visual generation (RAR, Yu et al. 2024, arXiv 2411.00776).

Importing rargen has no side effects: no network, no global torch flags, no patching.
"""

from rargen.checkpoint import load, save
from rargen.hub.releases import from_pretrained
from rargen.model import RAR, ModelConfig
from rargen.orders import random_order_prob, sample_orders
from rargen.sampling.engine import SampleConfig, generate, generate_images, token_probs
from rargen.sampling.inpaint import inpaint
from rargen.version import __version__

__all__ = [
    "RAR",
    "ModelConfig",
    "SampleConfig",
    "__version__",
    "from_pretrained",
    "generate",
    "generate_images",
    "inpaint",
    "load",
    "random_order_prob",
    "sample_orders",
    "save",
    "token_probs",
]
