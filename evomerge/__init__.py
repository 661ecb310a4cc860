"""evomerge: discover how to merge fine-tuned LLMs.

The package has two halves and user-facing ends on top; each module imports
only from its own layer or the ones below it (no import cycles):

- the merge engine, usable on its own: ``errors``, ``schema``, ``recipe``,
  ``methods/`` (the merge math), ``models`` (reading sources), ``devices``,
  ``plan`` (planning, ``InPlaceMerger``), ``folder`` (writing a model
  folder), ``routing`` (data-flow recipes), ``merge`` (``merge_to_disk``);
- the search built on it: ``config``, ``space_genes`` and ``space`` (points
  <-> recipes), ``drivers/`` (pycma, Optuna), ``evaluate`` (lm-eval and
  other objectives -> ``Score``), ``executors/`` (the worker; local and
  Ray), ``store`` (the run folder, its study and ``TrialRecord``),
  ``baselines``, ``schedulers`` and ``search`` (the loop);
- the ends: ``cli``, ``export`` (status, export), ``report``, ``demo``,
  with ``tiny`` and ``demo_problem`` (models and tasks made here).

Importing the package is cheap: heavy dependencies (torch, transformers,
lm-eval, optuna, cma, ray) are imported only by the modules that use them.
"""

from evomerge.errors import EvomergeError

__version__ = "0.1.0"
__all__ = ["EvomergeError", "__version__"]
