"""The `lkspec` command line."""
import sys


def main(argv=None) -> int:
    """Entry point of the `lkspec` console script."""
    return 0


if __name__ == "__main__":
    sys.exit(main())
