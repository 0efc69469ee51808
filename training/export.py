"""``python -m training.export CHECKPOINT OUT``: the command's earlier name, kept for users' scripts; the
export lives in ``training.checkpoint.export``."""

import sys

from training.checkpoint.export import main

if __name__ == "__main__":
    sys.exit(main())
