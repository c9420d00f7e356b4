"""FLUX's two text encoders, loaded from transformers-format folders (config.json + safetensors).

- `text_encoder/`   CLIPTextModel (CLIP-L): FLUX uses its pooled output [B, 768].
- `text_encoder_2/` T5EncoderModel (T5 v1.1 XXL): FLUX uses its last hidden state [B, L, 4096].

CLIP is mindone's `CLIPTextModel` (its dense/LayerNorm/bmm ops have CPU kernels and it compiles
with ms.jit) behind a thin cell; T5 is our own portable cell (`models/t5.py`), because mindone's
T5 uses mint ops without CPU kernels. Both load through `models/checkpoint.py`, which fails loudly
on missing or unexpected tensors instead of silently keeping random weights.
"""
import mindspore as ms
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from models.checkpoint import CheckpointError, StateDict, load_weights, read_config
from models.t5 import T5EncoderModel
from utils import device_target, resolve_dtype

# MindSpore names of nn.LayerNorm / nn.Embedding parameters -> transformers' names
_MS_TO_TORCH_SUFFIX = {".gamma": ".weight", ".beta": ".bias", ".embedding_table": ".weight"}

# activations whose mindone implementation runs on CPU (mindone's "gelu" uses mint gelu, which does not)
_CLIP_CPU_ACTIVATIONS = ("quick_gelu",)


class CLIPTextEncoder(nn.Cell):
    """input_ids [B, L] -> pooled output [B, hidden]: the final-norm hidden state at each prompt's EOS token.

    The EOS position follows transformers: with the old `eos_token_id == 2` configs it is the argmax of
    input_ids (the EOS id is the largest in CLIP's vocabulary), otherwise the first `eos_token_id`.
    """

    def __init__(self, clip_text_model):
        super().__init__()
        self.model = clip_text_model

    def construct(self, input_ids):
        return self.model(input_ids)[1]  # (last_hidden_state, pooler_output)


def _torch_name(ms_name):
    for ms_suffix, torch_suffix in _MS_TO_TORCH_SUFFIX.items():
        if ms_name.endswith(ms_suffix):
            return ms_name[: -len(ms_suffix)] + torch_suffix
    return ms_name


def load_clip_text_encoder(folder, dtype="float32"):
    """CLIPTextModel folder (`text_encoder/`) -> CLIPTextEncoder cell in `dtype`, in inference mode."""
    from transformers import CLIPTextConfig
    from mindone.transformers import CLIPTextModel  # imported here: mindone's import takes seconds

    dtype = resolve_dtype(dtype)
    read_config(folder)  # clear CheckpointError for a missing folder or config before transformers parses it
    config = CLIPTextConfig.from_pretrained(folder, local_files_only=True)
    if config.hidden_act not in _CLIP_CPU_ACTIVATIONS and device_target() == "CPU":
        raise ValueError(f"CLIP hidden_act {config.hidden_act!r} has no CPU kernel in mindone "
                         f"(supported here: {_CLIP_CPU_ACTIVATIONS})")
    model = CLIPTextModel(config)
    rename = {name: _torch_name(name) for name, _ in model.parameters_and_names()}
    # old checkpoints also store the constant position_ids buffer
    load_weights(model, StateDict(folder), dtype, rename=rename,
                 ignore_unexpected=("text_model.embeddings.position_ids",))
    model.set_train(False)
    encoder = CLIPTextEncoder(model)
    encoder.set_train(False)
    return encoder


def load_t5_encoder(folder, dtype="float32"):
    """T5EncoderModel folder (`text_encoder_2/`) -> T5EncoderModel cell in `dtype`, in inference mode.

    As in transformers, the FFN output projections `wo` stay fp32 in fp16/bf16 models: T5 v1.1
    activations overflow fp16 there.
    """
    dtype = resolve_dtype(dtype)
    with no_init_parameters():  # the checkpoint fills every weight: skip random init of T5-XXL's 4.7B
        model = T5EncoderModel(read_config(folder))
    state_dict = StateDict(folder)
    # transformers ties encoder.embed_tokens.weight to shared.weight and may save either one, or both
    rename, ignore = {}, ["decoder.", "lm_head."]  # a full T5 checkpoint also holds the unused decoder
    if "shared.weight" in state_dict:
        ignore.append("encoder.embed_tokens.weight")
    else:
        rename["shared.weight"] = "encoder.embed_tokens.weight"
    load_weights(model, state_dict, dtype, rename=rename, ignore_unexpected=tuple(ignore))
    if dtype != ms.float32:
        for name, param in model.parameters_and_names():
            if name.endswith(".wo.weight"):
                param.set_dtype(ms.float32)  # set_data alone would cast back to the parameter's dtype
                param.set_data(ms.Tensor(state_dict[name], ms.float32))
    model.set_train(False)
    return model


__all__ = ["CLIPTextEncoder", "CheckpointError", "load_clip_text_encoder", "load_t5_encoder"]
