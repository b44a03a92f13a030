import sys

from declora.cli import main

sys.exit(main())
