"""`python -m mergelang ...` is the `mergelang` command."""

import sys

from .startup import main

sys.exit(main())
