"""The user's face: the ``evomerge`` command line, status and export, the HTML
report and the demo (with the tiny models and tasks it and the tests use)."""
