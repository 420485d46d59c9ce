import sys

from caddtree.cli import main

sys.exit(main())
