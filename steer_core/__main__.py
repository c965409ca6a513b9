import sys

from steer_core.cli import main
from steer_core.model import keep_freed_memory

keep_freed_memory()
sys.exit(main())
