import sys

from contsparse.cli import main

sys.exit(main())
