"""The demo: a tiny base and two experts made on CPU (``problem``, ``tiny``)
and the search run on them (``run``)."""
