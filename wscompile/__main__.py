import sys

from wscompile.cli import main

sys.exit(main())
