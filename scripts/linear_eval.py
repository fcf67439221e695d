#!/usr/bin/env python
"""Linear probe and kNN: ``python scripts/linear_eval.py --checkpoint CKPT --train DIR --test DIR``."""
import sys

from simxent.cli import linear_eval_main

if __name__ == "__main__":
    sys.exit(linear_eval_main())
