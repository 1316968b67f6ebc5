"""`python -m chatd.ctl`: the `chatctl` command."""

import sys

from chatd.ctl.main import main

sys.exit(main())
