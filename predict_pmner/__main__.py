"""`python -m predict_pmner ...` (and `torchrun ... -m predict_pmner ...`): the same as `pmner-predict ...`."""

import sys

from .cli import main

sys.exit(main())
