"""The UTA ViT as a transformers vision tower (e.g. LlavaConfig(vision_config=UTAVisionConfig(...))).

`UTAVisionModel` wraps the one `UTAViT` definition and follows the contract transformers 5.x's Llava puts on a
vision tower (docs/environment.md#a-custom-vision-tower-in-transformers-llava): it takes `output_hidden_states` as
a bool, an int or a list of layer indices (Llava passes its `vision_feature_layer` there) and always returns
indexable `hidden_states`, CLS at token 0.
Importing this module registers the classes with AutoConfig / AutoModel under model_type "uta_vision".
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_uta.model.uta_vit import UTAViT, UTAViTConfig

# transformers' vision-config names -> UTAViTConfig fields
CONFIG_FIELDS = {
    "image_size": "img_size",
    "patch_size": "patch_size",
    "hidden_size": "width",
    "num_hidden_layers": "depth",
    "num_attention_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "projection_dim": "out_dim",
    "rope_ref_grid": "rope_ref_grid",
    "drop_path_rate": "drop_path_rate",
    "num_channels": "in_chans",
}
_DEFAULT = UTAViTConfig()


class UTAVisionConfig(PretrainedConfig):
    model_type = "uta_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        image_size: int = _DEFAULT.img_size,
        patch_size: int = _DEFAULT.patch_size,
        hidden_size: int = _DEFAULT.width,
        num_hidden_layers: int = _DEFAULT.depth,
        num_attention_heads: int = _DEFAULT.num_heads,
        mlp_ratio: float = _DEFAULT.mlp_ratio,
        projection_dim: int = _DEFAULT.out_dim,
        rope_ref_grid: int = _DEFAULT.rope_ref_grid,
        drop_path_rate: float = _DEFAULT.drop_path_rate,
        num_channels: int = _DEFAULT.in_chans,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.projection_dim = projection_dim
        self.rope_ref_grid = rope_ref_grid
        self.drop_path_rate = drop_path_rate
        self.num_channels = num_channels
        super().__init__(**kwargs)

    @classmethod
    def from_vit_config(cls, cfg: UTAViTConfig, **kwargs) -> UTAVisionConfig:
        return cls(**{hf: getattr(cfg, ours) for hf, ours in CONFIG_FIELDS.items()}, **kwargs)

    def to_vit_config(self) -> UTAViTConfig:
        return UTAViTConfig(**{ours: getattr(self, hf) for hf, ours in CONFIG_FIELDS.items()})


class UTAVisionModel(PreTrainedModel):
    config_class = UTAVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "uta_vision"
    input_modalities = ("image",)
    _supports_sdpa = True  # attention always runs through F.scaled_dot_product_attention
    supports_gradient_checkpointing = True
    _no_split_modules = ["EvaBlock"]

    def __init__(self, config: UTAVisionConfig):
        super().__init__(config)
        self.patch_size = config.patch_size  # Llava reads it when image_sizes are given
        self.vit = UTAViT(config.to_vit_config())
        self.post_init()

    @classmethod
    def from_vit(cls, vit: UTAViT) -> UTAVisionModel:
        """Wrap trained UTAViT weights (a student or an official tower) as a tower without drop-path."""
        model = cls(UTAVisionConfig.from_vit_config(dataclasses.replace(vit.cfg, drop_path_rate=0.0)))
        model.vit.load_state_dict({k: v for k, v in vit.state_dict().items() if k != "mask_token"})  # MIM-only
        return model

    def _init_weights(self, module: nn.Module) -> None:
        """EVA-style init through transformers' guarded initialisers (they skip loaded tensors), and the RoPE tables.

        The RoPE tables are non-persistent buffers, which from_pretrained leaves unset. Trained weights come from
        checkpoints (see from_vit and llava-uta-convert); the UTAViT constructor has the full pre-training init.
        """
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, UTAViT):
            init.trunc_normal_(module.pos_embed, std=0.02)
            init.trunc_normal_(module.cls_token, std=0.02)
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    def train(self, mode: bool = True) -> UTAVisionModel:
        """A frozen tower (no parameter requires grad) stays in eval mode whatever `mode` says.

        LLaVA freezes the tower and the Trainer calls `model.train()` on the whole Llava model every step: this keeps
        a tower configured with drop-path (a student's drop_path_rate) from making its features stochastic.
        """
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(mode and not frozen)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.vit.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.vit.set_grad_checkpointing(enable)

    def get_input_embeddings(self) -> nn.Module:
        return self.vit.patch_embed

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Hidden states are always returned (they cost no extra compute): whatever Llava asks for is there.

        last_hidden_state: the last block's tokens (= hidden_states[-1], before the final LayerNorm);
        pooler_output: the CLIP image embedding head(norm(CLS)).
        """
        x, hidden_states = self.vit.forward_blocks(pixel_values.to(self.vit.patch_embed.proj.weight.dtype))
        pooled = self.vit.head(self.vit.norm(x[:, 0]))
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states)


AutoConfig.register(UTAVisionConfig.model_type, UTAVisionConfig, exist_ok=True)
AutoModel.register(UTAVisionConfig, UTAVisionModel, exist_ok=True)
