import sys

from data_shards.dme.run import main

sys.exit(main())
