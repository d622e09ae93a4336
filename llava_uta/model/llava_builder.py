"""Assemble transformers' LlavaForConditionalGeneration from a vision tower and a causal LM.

    tokenizer = AutoTokenizer.from_pretrained("vicuna-7b")
    model = build_llava("vicuna-7b", "towers/uta-l14-336", tokenizer, projector_type="mlp2x_gelu")

The vision tower is a folder from `llava-uta-convert` (or a transformers CLIP folder), a loaded model, or a
config (random weights, for tests); the LM is any transformers causal-LM folder or GGUF file, model or config.
LLaVA's flags map onto LlavaConfig: `mm_vision_select_layer` -> `vision_feature_layer`, `mm_vision_select_feature`
`patch` / `cls_patch` -> `vision_feature_select_strategy` `default` / `full`. `<image>` is added to the tokenizer as
a special token; new embedding rows are set to the mean of the old ones, so the build is deterministic (a LoRA
merge rebuilds the same base).
"""

from __future__ import annotations

import os

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_utils import set_zero3_state
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava_uta.constants import DEFAULT_IMAGE_TOKEN
from llava_uta.model import language_model
from llava_uta.model.checkpoint import load_state_dict_file
from llava_uta.model.merge_llava import LlavaMergeConfig, LlavaMergeForConditionalGeneration
from llava_uta.model.projector import (
    MERGE_PROJECTOR,
    TokenMergeProjector,
    gathered,
    init_linear_projector,
    merge_factor,
    projector_activation,
)

SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}

PartSource = str | os.PathLike | PretrainedConfig | PreTrainedModel  # a folder or file, a config, a model


def add_image_token(tokenizer) -> int:
    """Make `<image>` one special token (and give the tokenizer a pad token); returns the image token id."""
    tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token  # what LLaVA does for v1 / llama-2
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)


def resize_embeddings(model: PreTrainedModel, num_tokens: int) -> None:
    """Grow the input/output embeddings to `num_tokens`; new rows = mean of the old rows (deterministic)."""
    old = model.get_input_embeddings().num_embeddings  # not weight.shape: a ZeRO-3 partitioned weight is empty
    if num_tokens <= old:
        return
    model.resize_token_embeddings(num_tokens, mean_resizing=False)
    layers = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}
    with gathered(layers.values(), modify=True), torch.no_grad():
        for weight in layers.values():
            weight[old:] = weight[:old].mean(0, keepdim=True)


def load_vision_tower(source: PartSource) -> PreTrainedModel:
    if isinstance(source, PreTrainedModel):
        return source
    if isinstance(source, PretrainedConfig):
        return AutoModel.from_config(source)
    if AutoConfig.from_pretrained(source).model_type == "clip":  # a full CLIP folder: keep its vision half
        return CLIPVisionModel.from_pretrained(source)
    return AutoModel.from_pretrained(source)


def load_language_model(source: PartSource, dtype: torch.dtype | None = None) -> PreTrainedModel:
    if isinstance(source, PreTrainedModel):
        return source
    if isinstance(source, PretrainedConfig):
        return AutoModelForCausalLM.from_config(source, dtype=dtype)
    return language_model.load_language_model(source, dtype)


def _path_or_none(source: PartSource) -> str | None:
    return str(source) if isinstance(source, str | os.PathLike) else None


def num_image_tokens(vision_config: PretrainedConfig, select_strategy: str, factor: int = 1) -> int:
    """Tokens per image after feature selection and merging: the patch grid / factor^2, plus CLS for `full`."""
    grid = vision_config.image_size // vision_config.patch_size
    if grid % factor:
        raise ValueError(f"a {grid}x{grid} patch grid cannot be merged in {factor}x{factor} blocks")
    return (grid // factor) ** 2 + (select_strategy == "full")


def build_llava(
    language_model: PartSource,
    vision_tower: PartSource,
    tokenizer,
    projector_type: str = "mlp2x_gelu",
    select_layer: int = -2,
    select_feature: str = "patch",
    dtype: torch.dtype | None = None,
    grid_tags: bool = False,
) -> LlavaForConditionalGeneration:
    """A Llava model around the given LM and tower, with a freshly initialised projector (`grid_tags`: the model's
    processor tags each image token with its grid cell, llava_uta.model.processors)."""
    factor = merge_factor(projector_type)
    merging = MERGE_PROJECTOR.fullmatch(projector_type) is not None
    if select_feature not in SELECT_FEATURES:
        raise ValueError(f"mm_vision_select_feature must be one of {sorted(SELECT_FEATURES)}, got {select_feature!r}")
    if merging and select_feature != "patch":
        raise ValueError(f"{projector_type} merges patch tokens: it needs mm_vision_select_feature patch (no CLS)")
    if grid_tags and select_feature != "patch":
        raise ValueError("mm_grid_tags tags patch tokens: it needs mm_vision_select_feature patch (no CLS)")
    lm = load_language_model(language_model, dtype)
    tower = load_vision_tower(vision_tower).requires_grad_(False).eval().to(lm.dtype)  # frozen, no drop-path
    image_token_id = add_image_token(tokenizer)
    resize_embeddings(lm, len(tokenizer))
    strategy = SELECT_FEATURES[select_feature]
    config_class, model_class = (LlavaMergeConfig, LlavaMergeForConditionalGeneration) if merging else \
        (LlavaConfig, LlavaForConditionalGeneration)
    config = config_class(
        vision_config=tower.config,
        text_config=lm.config,
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(tower.config, strategy, factor),
        projector_hidden_act=projector_activation(projector_type),
        vision_feature_layer=select_layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=lm.config.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        mm_projector_type=projector_type,
        mm_grid_tags=grid_tags,
        mm_vision_tower=_path_or_none(vision_tower),  # where a LoRA merge finds the base parts again
        mm_language_model=_path_or_none(language_model),
    )
    # An empty shell: the LM and the tower move in below. Under ZeRO-3 transformers would build (and initialise) the
    # shell's own LM and tower inside deepspeed.zero.Init; marking zero.Init as entered keeps them on meta, free.
    with torch.device("meta"), set_zero3_state():
        model = model_class(config)
    model.model.vision_tower = tower
    model.model.language_model = getattr(lm, lm.base_model_prefix)
    model.lm_head = lm.get_output_embeddings()
    projector = TokenMergeProjector(config) if merging else LlavaMultiModalProjector(config)
    model.model.multi_modal_projector = projector.to(lm.dtype)
    if projector_type == "linear":
        init_linear_projector(projector)
    model.generation_config = lm.generation_config
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"parameters left uninitialised while assembling Llava: {meta[:5]}")
    return model


def recorded_parts(
    config: LlavaConfig, model_base: PartSource | None = None, vision_tower: PartSource | None = None
) -> tuple[PartSource, PartSource]:
    """(base LLM, tower) of a training output: the given ones, else the paths its config.json records."""
    model_base = model_base or getattr(config, "mm_language_model", None)
    vision_tower = vision_tower or getattr(config, "mm_vision_tower", None)
    if not model_base or not vision_tower:
        raise ValueError("the run's config.json records no base LLM / tower: pass the base LLM (model_base, "
                         "--model-base) and the vision tower")
    return model_base, vision_tower


def rebuild_llava(
    config: LlavaConfig,
    tokenizer,
    model_base: PartSource | None = None,
    vision_tower: PartSource | None = None,
    dtype: torch.dtype | None = None,
) -> LlavaForConditionalGeneration:
    """A fresh Llava assembled as a training output's config.json records it (`build_llava` with its settings).

    The base LLM and tower are `recorded_parts`; the projector is freshly initialised, for the caller to load the
    trained one.
    """
    model_base, vision_tower = recorded_parts(config, model_base, vision_tower)
    select_feature = {v: k for k, v in SELECT_FEATURES.items()}[config.vision_feature_select_strategy]
    return build_llava(model_base, vision_tower, tokenizer, config.mm_projector_type, config.vision_feature_layer,
                       select_feature, dtype, getattr(config, "mm_grid_tags", False))


NON_LORA_FILE = "non_lora_trainables.safetensors"  # a LoRA run's projector (and unfrozen tower), beside the adapter


def load_lora_model(model_path: str | os.PathLike, model_base: str | None = None, vision_tower: str | None = None):
    """The LoRA-trained model, unmerged (a peft `PeftModel`): rebuilt base + trained projector + adapter."""
    from peft import PeftModel  # only LoRA outputs need peft

    config = AutoConfig.from_pretrained(model_path)
    base = rebuild_llava(config, language_model.load_tokenizer(model_path), model_base, vision_tower)
    if (
        base.config.image_token_id != config.image_token_id
        or base.config.text_config.vocab_size != config.text_config.vocab_size
    ):
        raise ValueError("the rebuilt base does not match the LoRA run's vocabulary (different LLM or tokenizer?)")
    trained = load_state_dict_file(os.path.join(model_path, NON_LORA_FILE))
    missing, unexpected = base.load_state_dict(trained, strict=False)
    tower = "model.vision_tower."
    has_tower = any(k.startswith(tower) for k in trained)
    partial = [k for k in missing if k.startswith("model.multi_modal_projector.") or has_tower and k.startswith(tower)]
    if unexpected or partial:
        raise ValueError(f"{os.path.join(model_path, NON_LORA_FILE)} does not fit the model's projector/tower: "
                         f"unexpected {unexpected[:5]}, missing {partial[:5]}")
    return PeftModel.from_pretrained(base, model_path)
