"""``python -m quantkit``: the quantkit command (see quantkit/cli.py)."""

from .cli import main

raise SystemExit(main())
