"""One rank of the training command as a user runs it (`torchrun ... -m rpo.train ARGS`), for
tests/train/test_train_command.py; started by tests/multirank.py. Exits with the command's status."""
import sys

from rpo.train.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="train.py"))
