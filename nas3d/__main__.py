import sys

from nas3d.cli import main

sys.exit(main())
