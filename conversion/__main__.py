"""`python -m conversion ...`: the same CLI as the installed `convnext-d2` script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
