"""``python -m harness`` is the ``trilemma`` command."""
import sys

from harness.cli import main

sys.exit(main())
