"""`python -m mmspec ...`, also what `accelerate launch -m mmspec` and `torchrun -m mmspec` run."""

from .cli import main

raise SystemExit(main())
