"""``python -m acmix`` runs the CLI (also under ``torchrun``)."""

import sys

from acmix.cli import main

sys.exit(main())
