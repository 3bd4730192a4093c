"""``python -m trilemma`` is the ``trilemma`` command."""
import sys

from trilemma.cli import main

sys.exit(main())
