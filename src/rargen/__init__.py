"""rargen: Randomized AutoRegressive visual generation (RAR, Yu et al. 2024, arXiv 2411.00776).

Importing rargen has no side effects: no network, no global torch flags, no patching.
"""

__version__ = "0.1.0"

from rargen.checkpoint import load, save  # noqa: E402
from rargen.model import RAR, ModelConfig  # noqa: E402
from rargen.orders import random_order_prob, sample_orders  # noqa: E402
from rargen.pretrained import from_pretrained  # noqa: E402
from rargen.sampling import SampleConfig, generate, generate_images, token_probs  # noqa: E402

__all__ = [
    "RAR",
    "ModelConfig",
    "SampleConfig",
    "__version__",
    "from_pretrained",
    "generate",
    "generate_images",
    "load",
    "random_order_prob",
    "sample_orders",
    "save",
    "token_probs",
]
