"""Trace replay (harness): the imbalance figure; replay itself runs in the CLI and bench tests."""

from __future__ import annotations

import subprocess
import sys

from dp_controller.harness.replay import imbalance


def test_imbalance_counts_only_samples_with_enough_requests() -> None:
    samples = [(0.0, [4, 4]), (0.1, [6, 2]), (0.2, [1, 0])]  # the last: mean below 2
    assert imbalance(samples) == (1.25, 1.5)
    assert imbalance([(0.0, [1, 0])]) == (1.0, 1.0)  # nothing counted: perfect by convention
    assert imbalance([(0.0, [1, 0])], min_mean=0.5) == (2.0, 2.0)


def test_the_package_does_not_import_the_harness() -> None:
    code = (
        "import sys, dp_controller, dp_controller.controller, dp_controller.harness as h\n"
        "assert 'dp_controller.harness.replay' not in sys.modules, 'imported by the package'\n"
        "assert not [n for n in vars(h) if not n.startswith('_')], 'harness re-exports'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
