"""The ``rargen`` command: one module per group of commands, flags derived from the configs."""
