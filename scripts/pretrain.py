#!/usr/bin/env python
"""SimCLR pretraining: ``python scripts/pretrain.py cpu data.train=DIR out=runs/x``."""
import sys

from simxent.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
