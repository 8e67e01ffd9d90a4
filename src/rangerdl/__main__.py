import sys

from rangerdl.cli import main

sys.exit(main())
