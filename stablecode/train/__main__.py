"""`python -m stablecode.train` / `torchrun ... -m stablecode.train`: the options of `stablecode train`."""

from __future__ import annotations

import argparse
import sys

from stablecode.errors import StablecodeError
from stablecode.train.cli import add_train_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stablecode.train", description="pre-train on packed token data")
    add_train_options(parser)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (StablecodeError, ValueError) as e:
        print(f"stablecode: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
