"""One search over time: the config, the run folder and its study, the drivers
that propose candidates, the schedules and executors that score them, and the
loop (``Run``) that ties them together and resumes after a kill.

It builds on ``engine``, ``search`` and ``fitness``; only ``app`` is above it.
"""
