"""LeMo: long-context fine-tuning with contextual token sparsity (arXiv 2501.09767).

from lemo import LeMoConfig, apply_lemo
model = apply_lemo(model, LeMoConfig(keep_ratio=0.4))
"""

from .apply import apply_lemo, lemo_state, remove_lemo
from .config import LeMoConfig

__all__ = ["LeMoConfig", "apply_lemo", "remove_lemo", "lemo_state"]
__version__ = "0.1.0"
