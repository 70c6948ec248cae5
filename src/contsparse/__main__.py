import os
import sys

# `python -m contsparse` (and `torchrun -m contsparse`) put the current directory first on the
# path: a local yaml.py or a folder named like an optional package would shadow installed ones.
# The console script does not; --imports finds the user's modules there without it.
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from contsparse.cli import main

sys.exit(main())
