"""``python -m simxent pretrain|linear-eval|demo|embed|search ...``, as the console scripts."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
