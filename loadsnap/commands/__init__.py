"""CLI subcommands of the library: every module here defines ``register(subparsers)``.

``loadsnap.cli`` discovers them, so adding a command is adding a module; their flags come from
``loadsnap.flags``.
"""
