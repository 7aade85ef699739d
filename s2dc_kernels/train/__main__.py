"""``python -m s2dc_kernels.train``: the same command line as ``s2dc-train``."""

from .cli import main

raise SystemExit(main())
