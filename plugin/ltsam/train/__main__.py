"""``python -m ltsam.train ...`` (also ``torchrun ... -m ltsam.train ...``)."""

import sys

from ltsam.train import main

sys.exit(main())
