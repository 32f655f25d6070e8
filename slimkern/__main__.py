import sys

from slimkern.cli import main

sys.exit(main())
