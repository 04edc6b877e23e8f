"""Every ModelConfig field is honoured alike by both frameworks (or rejected by the config itself).

`ALTERNATIVES` gives each field (dotted: `llm.hidden_act`) a non-default value, with whatever else that
value needs (a Qwen field needs the Qwen tower); a field missing from the table fails
`test_table_covers_every_field`, so a new field cannot be added without this check. For each entry a
random torch model is converted to JAX (cross_helpers.make_pair) and both run one batch of two samples
(text before the first image, two images; one image and right padding): logits agree to 1e-5 in float32
at every non-padding position. The JAX forward runs eagerly (no jit), so the ~40 configs share the
per-op compilations instead of compiling one program each. `llm.initializer_range` (which redrawn weights
hide) is checked on the init itself: the decoder's weights have that std in both frameworks. The
activation table matches transformers' ACT2FN for every accepted `hidden_act` name.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from cross_helpers import make_config, make_pair
from flax import nnx
from transformers.activations import ACT2FN

from vchat.config import ACTIVATIONS, LLMConfig, ModelConfig
from vchat.param_map import expand
from vchat_jax import VisualChat as JaxVisualChat
from vchat_jax.layers import ACT
from vchat_jax.model import forward_planned
from vchat_jax.state_dict import to_state_dict
from vchat_torch import VisualChat as TorchVisualChat
from vchat_torch.checkpoint import load_state_dict_strict

ATOL = 1e-5
QWEN = dict(kind="qwen", hidden_act="gelu", layer_norm_eps=1e-6, output_dim=128, n_queries=16)
# field -> {sub-config or top-level field: changes}; every value differs from the field's default
ALTERNATIVES = {
    "vision.kind": {"vision": QWEN},
    "vision.image_size": {"vision": dict(image_size=48)},
    "vision.patch_size": {"vision": dict(patch_size=16)},
    "vision.hidden_size": {"vision": dict(hidden_size=64)},
    "vision.intermediate_size": {"vision": dict(intermediate_size=80)},
    "vision.num_hidden_layers": {"vision": dict(num_hidden_layers=1)},
    "vision.num_attention_heads": {"vision": dict(num_attention_heads=2)},
    "vision.num_channels": {"vision": dict(num_channels=1)},
    "vision.layer_norm_eps": {"vision": dict(layer_norm_eps=0.5)},
    "vision.hidden_act": {"vision": dict(hidden_act="gelu_new")},
    "vision.output_dim": {"vision": {**QWEN, "output_dim": 256}},
    "vision.n_queries": {"vision": {**QWEN, "n_queries": 4}},
    "vision.pos_embed_rows": {"vision": {**QWEN, "pos_embed_rows": 64}},
    "llm.vocab_size": {"llm": dict(vocab_size=120)},
    "llm.hidden_size": {"llm": dict(hidden_size=96)},
    "llm.intermediate_size": {"llm": dict(intermediate_size=100)},
    "llm.num_hidden_layers": {"llm": dict(num_hidden_layers=1)},
    "llm.num_attention_heads": {"llm": dict(num_attention_heads=8)},
    "llm.num_key_value_heads": {"llm": dict(num_key_value_heads=1)},
    "llm.rms_norm_eps": {"llm": dict(rms_norm_eps=0.5)},
    "llm.rope_theta": {"llm": dict(rope_theta=50.0)},
    "llm.max_position_embeddings": {"llm": dict(max_position_embeddings=512)},
    "llm.hidden_act": {"llm": dict(hidden_act="gelu_pytorch_tanh")},
    "llm.tie_word_embeddings": {"llm": dict(tie_word_embeddings=True)},
    "llm.initializer_range": {"llm": dict(initializer_range=0.1)},
    "projection.kind": {"projection": dict(kind="vit")},
    "projection.perceiver_grid": {"projection": dict(kind="perceiver", perceiver_grid=2)},
    "mmca": {"mmca": False},
    "compat": {"compat": "dsvc"},
    "attention": {"attention": "dense"},
    "bos_token_id": {"bos_token_id": 3},
    "eos_token_id": {"eos_token_id": 4},
    "pad_token_id": {"pad_token_id": 0},
    "image_token_id": {"image_token_id": 90},
    "image_pretoken_id": {"image_pretoken_id": 91},
}
BASE = make_config()


def field_names(cls, prefix: str = "") -> list[str]:
    names = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        names += field_names(type(sub), f"{f.name}.") if dataclasses.is_dataclass(sub) else [prefix + f.name]
    return names


def configured(name: str) -> ModelConfig:
    changes = {}
    for key, value in ALTERNATIVES[name].items():
        changes[key] = dataclasses.replace(getattr(BASE, key), **value) if isinstance(value, dict) else value
    return BASE.replace(**changes)


def batch(config: ModelConfig, seed: int = 0) -> dict:
    """Two right-padded samples: text, an image, text, an image, text; and text, an image, text."""
    rng = np.random.default_rng(seed)
    special = {config.bos_token_id, config.eos_token_id, config.pad_token_id, config.image_token_id}
    vocab = [t for t in range(3, 89) if t not in special]
    text = lambda n: list(rng.choice(vocab, n))
    img, pre = config.image_token_id, config.image_pretoken_id
    rows = [[config.bos_token_id, *text(5), pre, img, *text(4), pre, img, *text(6)],
            [config.bos_token_id, *text(3), pre, img, *text(3)]]
    T = len(rows[0])
    ids = np.full((2, T), config.pad_token_id, np.int64)
    mask = np.zeros((2, T), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = r, 1
    v = config.vision
    images = rng.standard_normal((3, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return {"ids": ids, "mask": mask, "images": images, "image_num": np.array([2, 1])}


def test_table_covers_every_field():
    names = field_names(ModelConfig)
    missing, unknown = sorted(set(names) - set(ALTERNATIVES)), sorted(set(ALTERNATIVES) - set(names))
    assert not missing and not unknown, f"fields without an alternative: {missing}; not fields: {unknown}"
    for name in names:
        owner, _, leaf = name.rpartition(".")
        default = getattr(getattr(BASE, owner) if owner else BASE, leaf)
        changed = configured(name)
        assert getattr(getattr(changed, owner) if owner else changed, leaf) != default, name


def torch_and_jax_logits(config: ModelConfig):
    """Both frameworks' logits on `batch(config)` (same weights), and the valid positions (B, L)."""
    tm, jm = make_pair(config)
    b = batch(config)
    t = torch.from_numpy
    with torch.no_grad():
        out = tm(t(b["images"]), t(b["ids"]), t(b["mask"]), image_num=b["image_num"])
    plan = jm.plan(b["ids"], b["mask"], b["image_num"])
    with jax.default_matmul_precision("highest"):
        logits_j = np.asarray(forward_planned(jm, plan, jnp.asarray(b["images"]), with_loss=False).logits)
    np.testing.assert_array_equal(out.modality.numpy(), plan.modality)
    return out.logits.numpy(), logits_j, plan.modality > 0, jm


@pytest.mark.parametrize("name", list(ALTERNATIVES))
def test_torch_equals_jax_logits(name):
    config = configured(name)
    logits_t, logits_j, valid, jm = torch_and_jax_logits(config)
    diff = float(np.abs(logits_t - logits_j)[valid].max())
    assert diff <= ATOL, f"{name}: logits max |diff| {diff:.3e}"
    if config.llm.tie_word_embeddings:
        assert "lm_head" not in nnx.to_pure_dict(nnx.state(jm, nnx.Param))["lang_decoder"]
        assert "lang_decoder.lm_head.weight" not in {e.torch for e in expand(config)}


def test_qwen_tower_honours_hidden_act():
    """The Qwen tower's MLP activation follows vision.hidden_act in both frameworks (Qwen-VL: "gelu")."""
    logits = {}
    for act in ("gelu", "relu"):
        config = BASE.replace(vision=dataclasses.replace(BASE.vision, **{**QWEN, "hidden_act": act}))
        logits_t, logits_j, valid, _ = torch_and_jax_logits(config)
        assert float(np.abs(logits_t - logits_j)[valid].max()) <= ATOL, act
        logits[act] = logits_t[valid]
    assert float(np.abs(logits["gelu"] - logits["relu"]).max()) > 1e-3


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_initializer_range_sets_the_init_std_in_both(std):
    config = BASE.replace(llm=dataclasses.replace(BASE.llm, initializer_range=std))
    torch.manual_seed(0)
    tsd = TorchVisualChat(config).state_dict()
    jsd = nnx.to_pure_dict(nnx.state(JaxVisualChat(config, nnx.Rngs(0)), nnx.Param))
    jdec = jsd["lang_decoder"]
    pairs = {"embed_tokens": (tsd["lang_decoder.model.embed_tokens.weight"],
                              jdec["model"]["embed_tokens"]["embedding"]),
             "q_proj": (tsd["lang_decoder.model.layers.0.self_attn.q_proj.weight"],
                        jdec["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]),
             "gate_proj": (tsd["lang_decoder.model.layers.1.mlp.gate_proj.weight"],
                           jdec["model"]["layers"][1]["mlp"]["gate_proj"]["kernel"]),
             "lm_head": (tsd["lang_decoder.lm_head.weight"], jdec["lm_head"]["kernel"])}
    for part, (tw, jw) in pairs.items():
        st, sj = float(tw.std()), float(np.asarray(jw).std())
        assert abs(st - std) < 0.05 * std and abs(sj - std) < 0.05 * std, (part, st, sj)


def test_activation_tables_match_transformers():
    x = np.linspace(-8, 8, 1001, dtype=np.float32)
    for name in ACTIVATIONS:
        want = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(ACT[name](jnp.asarray(x))), want, atol=1e-6, rtol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="hidden_act"):
        LLMConfig(hidden_act="geglu")


def test_tied_checkpoints_round_trip(tmp_path):
    """A tied lm_head is stored once (embed_tokens): torch save -> torch and JAX loads, JAX -> torch strictly."""
    config = configured("llm.tie_word_embeddings")
    tm, jm = make_pair(config)
    tm.save_pretrained(str(tmp_path / "tied"))
    back_t = TorchVisualChat.from_pretrained(str(tmp_path / "tied"))
    assert back_t.lang_decoder.lm_head.weight is back_t.lang_decoder.model.embed_tokens.weight
    back_j = JaxVisualChat.from_pretrained(str(tmp_path / "tied"))
    sd = to_state_dict(back_j)
    assert "lang_decoder.lm_head.weight" not in sd
    fresh = TorchVisualChat(config)
    load_state_dict_strict(fresh, {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, source="jax")
    for k, v in tm.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and torch.equal(back_t.state_dict()[k], v), k
