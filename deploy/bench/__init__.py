"""`make bench`: how fast the shop is, and what its reliability costs, measured as ratios
against baselines taken side by side in the same run (see `deploy/bench/__main__.py`)."""
