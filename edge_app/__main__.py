import sys

from edge_app.cli import main

sys.exit(main())
