"""``python -m kvserve`` is the ``kvserve`` command."""
import sys

from .cli import main

sys.exit(main())
