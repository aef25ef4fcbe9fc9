"""The bottom of the stack (no project imports): the strict typed-config loader every other folder uses, the
command-line helpers (cli.py) and atomic file writes (atomic.py)."""
