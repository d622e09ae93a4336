"""Model sources: the one syntax of every flag that names a model to load (docs/model-sources.md).

    open_clip:NAME@WEIGHTS     a built-in open_clip architecture, its weights from a local file
    open_clip:local-dir:DIR    an open_clip folder (open_clip_config.json + weights), e.g. the quickstart's teacher
    uta:FILE                   a UTA student (FILE.json beside it) or a released UTA checkpoint
    hf:DIR                     a transformers vision-tower folder (config.json), e.g. from llava-uta-convert
    DIR or FILE                the same, by what is there: open_clip_config.json, config.json, or a file (uta)
    random:SOURCE              SOURCE's architecture with fresh weights (only its config is read)

The spellings of the last release still parse, with a FutureWarning that gives the new one: the `openclip:` prefix,
an open_clip NAME or `local-dir:DIR` without `open_clip:`, and a weights file in a flag of its own
(`with_weights_flag`). They go in the next release.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

KIND_NAMES = {"open_clip": "an open_clip model", "uta": "a UTA checkpoint", "hf": "a transformers tower folder"}
KINDS = tuple(KIND_NAMES)
RANDOM_PREFIX = "random:"
LOCAL_DIR = "local-dir:"  # open_clip's own name of a model folder
OLD_OPEN_CLIP_PREFIX = "openclip:"
GUIDE = "docs/model-sources.md"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: its kind, what to read, an open_clip NAME's weights file, fresh weights or not."""

    kind: str  # one of KINDS
    target: str  # open_clip: the model name open_clip takes (NAME, or local-dir:DIR); uta: a file; hf: a folder
    weights: str | None = None  # open_clip NAME only: its local weights file
    random_init: bool = False

    def __str__(self) -> str:
        """The spelling that parses back to this source."""
        body = f"{self.kind}:{self.target}" + (f"@{self.weights}" if self.weights else "")
        return RANDOM_PREFIX + body if self.random_init else body

    @property
    def has_weights(self) -> bool:
        """Whether it names trained weights: a checkpoint, a folder, or an open_clip NAME with its weights file."""
        return self.kind != "open_clip" or self.weights is not None or self.target.startswith(LOCAL_DIR)


def parse_model_source(text: str | os.PathLike | ModelSource, kinds: tuple[str, ...] = KINDS) -> ModelSource:
    """Parse a model source (the module docstring's syntax), refusing kinds other than `kinds` with what to give."""
    if isinstance(text, ModelSource):
        source = text
    else:
        text = os.fspath(text)
        body = text.removeprefix(RANDOM_PREFIX)
        kind, target, old = _kind_and_target(text, body)
        weights = None
        if kind == "open_clip" and not target.startswith(LOCAL_DIR) and "@" in target:
            target, _, weights = target.partition("@")
        if not target or weights == "":
            raise ValueError(f"model source {text!r}: empty {kind} {'weights file' if target else 'target'} "
                             f"(see {GUIDE})")
        source = ModelSource(kind, target, weights, random_init=body != text)
        if old:  # stacklevel 1, one location: Python shows a message once however many callers parse the text
            warnings.warn(f"model source {text!r}: {old} is deprecated and goes in the next release; write "
                          f"{str(source)!r} (see {GUIDE})", FutureWarning, stacklevel=1)
    if source.kind not in kinds:
        wanted = " or ".join(KIND_NAMES[k] for k in kinds)
        raise ValueError(f"model source {str(source)!r} is {KIND_NAMES[source.kind]}; {wanted} is needed here "
                         f"(see {GUIDE})")
    return source


def _kind_and_target(text: str, body: str) -> tuple[str, str, str | None]:
    """(kind, target with any @WEIGHTS, the old spelling used or None) of a source without its random: prefix."""
    if body.startswith(OLD_OPEN_CLIP_PREFIX):
        return "open_clip", body.removeprefix(OLD_OPEN_CLIP_PREFIX), f"the prefix {OLD_OPEN_CLIP_PREFIX!r}"
    for kind in KINDS:
        if body.startswith(f"{kind}:"):
            return kind, body.removeprefix(f"{kind}:"), None
    if body.startswith(LOCAL_DIR):
        return "open_clip", body, f"{LOCAL_DIR}DIR without 'open_clip:'"
    path = Path(body)
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return "open_clip", LOCAL_DIR + body, None
        if (path / "config.json").is_file():
            return "hf", body, None
        raise FileNotFoundError(f"model source {text!r}: folder {path} has neither open_clip_config.json (an "
                                f"open_clip folder) nor config.json (a transformers tower folder)")
    if path.is_file():
        return "uta", body, None
    import open_clip  # only here: the other spellings need no model registry

    if body.partition("@")[0] in open_clip.list_models():
        return "open_clip", body, "an open_clip NAME without 'open_clip:'"
    raise FileNotFoundError(f"model source {text!r}: no such file or folder; give open_clip:NAME@WEIGHTS, "
                            f"open_clip:local-dir:DIR, uta:FILE, hf:DIR or an existing file or folder, optionally "
                            f"after random: (see {GUIDE})")


def with_weights_flag(source: str | None, weights: str | os.PathLike | None, source_flag: str,
                      weights_flag: str) -> str | None:
    """`SOURCE_FLAG SOURCE WEIGHTS_FLAG FILE`, the last release's spelling, as the one source it now is (with a
    FutureWarning giving it); SOURCE unchanged without FILE. SOURCE may be a kind alone (`--model uta --checkpoint
    FILE`)."""
    if weights is None:
        return source
    if source is None:
        raise ValueError(f"{weights_flag} {weights} needs {source_flag}")
    weights = os.fspath(weights)
    if source in KINDS:
        parsed = ModelSource(source, weights)
    else:
        parsed = parse_model_source(source)
        if parsed.kind != "open_clip" or parsed.has_weights:
            raise ValueError(f"{weights_flag} {weights}: {source_flag} {source} holds its own weights; give no "
                             f"separate weights file (see {GUIDE})")
        parsed = replace(parsed, weights=weights)
    warnings.warn(f"{source_flag} {source} {weights_flag} {weights} is deprecated and goes in the next release; write "
                  f"{source_flag} {parsed} (see {GUIDE})", FutureWarning, stacklevel=1)
    return str(parsed)
