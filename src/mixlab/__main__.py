import sys

from mixlab.cli import main

sys.exit(main())
