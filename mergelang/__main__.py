"""`python -m mergelang ...` is the `mergelang` command."""

import sys

from .cli import main

sys.exit(main())
