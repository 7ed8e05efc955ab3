"""Pure PyTorch: embedders, the checkpoint format, losses, training and evaluation (never imports app or index).

Importing any part of `models` imports this package first, which registers every embedder arch with
models.embedder ("timm" is defined there): a checkpoint of any arch can then be rebuilt. A missing arch module is
an ImportError here, never a silently unknown arch later.
"""

from models import abe, ensemble, irt, osme

__all__ = ["abe", "ensemble", "irt", "osme"]  # imported to register their archs
