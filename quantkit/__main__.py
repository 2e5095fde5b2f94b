"""``python -m quantkit``: the quantkit command (see quantkit/cli/)."""

from .cli import main

raise SystemExit(main())
