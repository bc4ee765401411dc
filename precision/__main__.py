import sys

from precision.cli import main

sys.exit(main())
