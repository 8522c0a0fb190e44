"""``python -m loadsnap`` runs the CLI."""

from __future__ import annotations

import sys

from loadsnap.cli import main

sys.exit(main())
