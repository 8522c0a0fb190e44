"""The harness: what runs a whole deployment on one machine for the demo, tests and benchmarks.

Not production code and not re-exported by :mod:`dp_controller`: :mod:`.fleet` starts reference
schedulers as subprocesses, :mod:`.workload` makes seeded request traces, :mod:`.loss`
audits what happened to every request, :mod:`.replay` replays a trace through a controller,
:mod:`.demo` is ``loadsnap demo``. Public test doubles
of loadsnap's own interfaces are in :mod:`loadsnap.testing`.
"""
