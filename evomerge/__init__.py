"""evomerge: discover how to merge fine-tuned LLMs.

Importing the package is cheap: heavy dependencies (torch, transformers,
lm-eval, optuna, cma, ray) are imported only by the modules that use them.
"""

from evomerge.errors import EvomergeError

__version__ = "0.1.0"
__all__ = ["EvomergeError", "__version__"]
