"""`python -m hyperhive.agent`: the harness entry point used inside containers."""

import sys

from hyperhive.agent.main import main

sys.exit(main())
