"""python -m resforge: the CLI (also what torchrun -m resforge starts in each process)."""
import sys

from resforge.cli import main

sys.exit(main())
