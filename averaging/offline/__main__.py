"""python -m averaging.offline: the offline merges (averaging/offline/__init__.py)."""
import sys

from averaging.offline.cli import main

sys.exit(main())
