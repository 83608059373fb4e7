"""``python -m slimtune`` (and ``torchrun ... -m slimtune``) runs the CLI."""

import sys

from slimtune.cli import main

sys.exit(main())
