"""``python -m rargen`` = the ``rargen`` command (torchrun launches it this way)."""

from rargen.cli.main import main

raise SystemExit(main())
