"""Drop-in replacements for other projects' load-snapshot modules, backed by loadsnap.

:mod:`loadsnap.compat.sglang` has the public interface of sglang's
``sglang.srt.managers.load_snapshot``.
"""
