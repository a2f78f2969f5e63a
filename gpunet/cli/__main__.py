"""``python -m gpunet.cli``: the ``gpunet`` command."""

from __future__ import annotations

import sys

from gpunet.cli import main

if __name__ == "__main__":
    sys.exit(main())
