"""``python -m cml_rs``: the same as the ``cml-rs`` command."""

import sys

from .cli import main

sys.exit(main())
