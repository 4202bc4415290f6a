"""`python -m mmspec.demos`: the same as `mmspec demo`."""

from mmspec.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["demo", *sys.argv[1:]]))
