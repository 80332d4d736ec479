"""`python -m edgellm ...`: the same command line as `edgellm ...`."""

from .cli import main

if __name__ == "__main__":
    main()
