import sys

from steer_core.cli import main

sys.exit(main(process_wide=True))
