"""How a candidate is scored: objectives and their lm-eval tasks, perplexity
and custom objectives giving a ``Score``; paired statistics, the selection
race and the default merges every search is compared with.

It builds on ``evomerge.engine`` and on nothing above it.
"""
