"""The bottom of the stack: the strict typed-config loader every other folder uses (no project imports)."""
