import sys

from cope_megatron.cli import main

sys.exit(main())
