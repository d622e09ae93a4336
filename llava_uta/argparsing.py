"""Flags in either spelling: `--model-path` or `--model_path`, `--image_size` or `--image-size`, for every tool.

transformers' HfArgumentParser (the training tools') accepts both spellings of every flag; the other tools use this
ArgumentParser, which does the same, so a flag never fails for its dash or underscore. The help shows each tool's
own spelling.
"""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._respell(token) for token in args], namespace)

    def _respell(self, token: str) -> str:
        """A long flag this parser knows only in the other spelling, in its own (`--a_b=1` -> `--a-b=1`)."""
        if not token.startswith("--") or token == "--":
            return token
        flag, eq, value = token.partition("=")
        if flag in self._option_string_actions:
            return token
        for twin in ("--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")):
            if twin in self._option_string_actions:
                return twin + eq + value
        return token
