"""`python -m posttrain ...` (and `torchrun ... -m posttrain ...`): the `posttrain` command."""

from posttrain.cli import main

if __name__ == "__main__":
    main()
