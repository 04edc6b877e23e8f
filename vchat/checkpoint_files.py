"""The file names of every checkpoint layout, in one place (both frameworks, converters and trainers
import them from here).

    vchat directory (vchat_torch)   config.json + model.safetensors [+ tokenizer.json]
    vchat directory (vchat_jax)     config.json + params/ (orbax)   [+ tokenizer.json]
    reference checkpoint ("dsvc")   pytorch_model.bin (+ meta.json in the golden cases)
"""

CONFIG_NAME = "config.json"  # ModelConfig.save / load_checkpoint_config
WEIGHTS_NAME = "model.safetensors"  # vchat_torch's weights: reference key names, torch layouts
PARAMS_DIR = "params"  # vchat_jax's orbax parameters: JAX layouts
TOKENIZER_NAME = "tokenizer.json"  # the tokenizer a checkpoint was trained with
PREPROCESSOR_NAME = "preprocessor_config.json"  # its image preprocessing (CLIPImageProcessor fields), when not the default
DSVC_WEIGHTS_NAME = "pytorch_model.bin"  # the reference's training script (torch.save)
DSVC_META_NAME = "meta.json"  # a reference checkpoint's model description (ModelConfig.from_dsvc_meta)
