"""The ``ltsam`` console script: ``ltsam train ...``, ``ltsam eval ...``,
``ltsam shards write|verify|digest|info ...``.

It lives here, not in ``ltsam``, because ``import ltsam`` imports torch and timm (seconds): ``ltsam --help``
and ``ltsam train --help`` answer without them, and each command imports its module only when it runs.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable


def _train(argv: list[str]) -> int:
    from ltsam_common.train_args import parse_args

    parse_args(argv)  # torch-free: --help and a mistyped flag answer before torch and timm are imported
    from ltsam.train import main

    return main(argv)


def _shards(argv: list[str]) -> int:
    from ltsam.data.shards import main

    return main(argv, prog="ltsam shards")


def _eval(argv: list[str]) -> int:
    from ltsam.evaluate import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train a model on a long-tailed data set (ltsam train --help)"),
    "shards": (_shards, "write, verify, digest or describe webdataset shards (ltsam shards --help)"),
    "eval": (_eval, "evaluate a checkpoint on long-tailed and out-of-distribution sets (ltsam eval --help)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: ltsam <command> [options]\n\ncommands:\n" + "\n".join(
        f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"ltsam: unknown command '{argv[0]}'{hint}\n\n{usage}", file=sys.stderr)
        return 2
    return command[0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
