"""python -m flashattn.bench.paper: the same as python -m flashattn.bench paper."""
import sys

from flashattn.bench.paper.cli import main

sys.exit(main())
