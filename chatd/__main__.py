"""`python -m chatd`: the daemon, as the `chatd` command."""

import sys

from chatd.server.main import main

sys.exit(main())
