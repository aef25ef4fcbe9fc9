"""The bottom of the stack (no project imports): the strict typed-config loader every other folder uses, the
command-line helpers (cli.py), atomic file writes (atomic.py), the chunked file sha256 (hashing.py) and the
tests' fault-injection hooks (faults.py)."""
