"""``python -m dp_controller``: run the DP controller (see ``dp_controller.cli``)."""

from __future__ import annotations

import sys

from dp_controller.cli import main

if __name__ == "__main__":
    sys.exit(main())
