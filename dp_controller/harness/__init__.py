"""Test and benchmark harness for the DP controller (trace replay, ...); not production code.

Nothing is re-exported here, and ``dp_controller`` does not import this package: import the
modules themselves (``dp_controller.harness.replay``).
"""
