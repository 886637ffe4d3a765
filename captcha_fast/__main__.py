"""`python -m captcha_fast COMMAND ...` and `torchrun -m captcha_fast train ...`: the command line."""
import sys

from captcha_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
