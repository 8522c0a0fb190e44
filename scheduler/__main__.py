"""``python -m scheduler``: run one reference scheduler (see ``scheduler.cli``)."""

from __future__ import annotations

import sys

from scheduler.cli import main

if __name__ == "__main__":
    sys.exit(main())
