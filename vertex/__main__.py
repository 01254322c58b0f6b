"""Entry point for ``python -m vertex``."""

from vertex.cli import main

raise SystemExit(main())
