"""`python -m megaphi.ops`: which LayerNorm/rotary backends can run here, and why not."""

from .backend import describe


def main():
    for line in describe():
        print(line)


if __name__ == "__main__":
    main()
