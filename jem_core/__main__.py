"""`python -m jem_core`: the `jem` command line."""
import sys

from .cli import main

if __name__ == "__main__":  # importing the module (e.g. the import test) runs nothing
    sys.exit(main())
