"""The pre-training tools' old console-script names (`uta-*`), kept for one release: each says its new name
(`llava-uta-*`, the one prefix of every tool here) and runs the tool."""

from __future__ import annotations

import sys
from collections.abc import Callable


def _renamed(old: str, new: str, main: Callable[[], None]) -> None:
    print(f"{old} is deprecated and goes in the next release: use {new} (same flags)", file=sys.stderr)
    main()


def uta_masks() -> None:
    from pretrain.masking import main

    _renamed("uta-masks", "llava-uta-masks", main)


def uta_pretrain() -> None:
    from pretrain.train import main

    _renamed("uta-pretrain", "llava-uta-pretrain", main)


def uta_finetune_clip() -> None:
    from pretrain.finetune_clip import main

    _renamed("uta-finetune-clip", "llava-uta-finetune-clip", main)
