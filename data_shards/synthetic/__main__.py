"""``python -m data_shards.synthetic``: see ``data_shards.synthetic.cli``."""

import sys

from data_shards.synthetic.cli import main

sys.exit(main())
