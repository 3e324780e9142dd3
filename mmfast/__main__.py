"""``python -m mmfast ...`` runs the ``mmfast`` command."""

import sys

from mmfast.cli import main

sys.exit(main())
