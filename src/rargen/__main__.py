"""``python -m rargen ...`` (and ``torchrun -m rargen train ...``): the ``rargen`` command."""

from rargen.cli import main

raise SystemExit(main())
