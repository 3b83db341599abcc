import sys

from cope_megatron.cli import main

if __name__ == "__main__":  # not when a forkserver/spawn child re-imports the main module
    sys.exit(main())
