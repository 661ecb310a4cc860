"""``python -m evomerge`` is the ``evomerge`` command."""

from evomerge.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
