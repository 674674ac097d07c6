import sys

from compactmind.cli import main

sys.exit(main())
