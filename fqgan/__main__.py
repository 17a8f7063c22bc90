"""``python -m fqgan <command>`` (also what ``torchrun ... -m fqgan <command>`` runs)."""

import sys

from fqgan.cli import main

sys.exit(main())
