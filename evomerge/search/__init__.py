"""The search space: the only code that maps an optimizer's points to recipes
and back (``SearchSpace``, composed of merge genes and route genes).

It builds on ``evomerge.engine`` (recipes, the method registry) and on
nothing above it.
"""
