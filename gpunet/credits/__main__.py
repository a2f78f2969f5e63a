"""``python -m gpunet.credits serve|verify|receipt``: the credit verbs without the rest of gpunet's CLI."""

from __future__ import annotations

import sys

from gpunet.credits.cli import main

if __name__ == "__main__":
    sys.exit(main())
