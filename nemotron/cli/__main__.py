import sys

from nemotron.cli import main

sys.exit(main())
