"""``python -m cope_megatron.data.prep [CONFIG.yaml ...] [key.sub=value ...]``: the same as
``cope-megatron prep``."""

import sys

from cope_megatron.cli import main

sys.exit(main(["prep", *sys.argv[1:]]))
