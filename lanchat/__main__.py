"""``python -m lanchat`` runs the CLI."""

from lanchat.cli import main

raise SystemExit(main())
