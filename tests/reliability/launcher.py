"""A stand-in for torchrun in tests/reliability: starts WORLD ranks of a worker script (tests/multirank.py, plain
child processes) and waits for them. The test SIGKILLs this process to see what its orphaned ranks do.

    python launcher.py WORLD LOG_DIR SCRIPT ARGS...
"""
import sys

import multirank

if __name__ == "__main__":
    world, log_dir, script, *args = sys.argv[1:]
    result = multirank.start(script, int(world), args=args, log_dir=log_dir, name="orphan").wait(timeout=600)
    sys.exit(result.returncode)
