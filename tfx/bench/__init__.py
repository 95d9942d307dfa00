"""`tfx bench`: speed and memory harnesses; each prints a table and writes JSON, CSV or a plot."""
