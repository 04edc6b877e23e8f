import json

import pytest

from vchat.config import PRESETS, LLMConfig, ModelConfig, ProjectionConfig, VisionConfig, preset


def n_params_llama(c: LLMConfig) -> int:
    attn = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + c.hidden_size**2
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_layer = attn + mlp + 2 * c.hidden_size
    return c.num_hidden_layers * per_layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size


@pytest.mark.parametrize("name,billions", [("llama2-7b-clip-l14", 6.74), ("llama2-13b-qwen", 13.02),
                                           ("llama2-70b-qwen", 68.98)])
def test_real_presets_have_true_sizes(name, billions):
    # Published LLaMA-2 sizes (32000 vocab) plus 3 added rows in embed_tokens and lm_head.
    assert n_params_llama(PRESETS[name].llm) / 1e9 == pytest.approx(billions, abs=0.01)


def test_real_geometry():
    c7 = PRESETS["llama2-7b-clip-l14"]
    assert c7.image_tokens == 257 and c7.vision.out_dim == 1024 and c7.image_token_id == 32001
    c70 = PRESETS["llama2-70b-qwen"]
    assert c70.llm.num_kv_groups == 8 and c70.image_tokens == 256 and c70.vision.out_dim == 4096


def test_json_round_trip(tmp_path):
    cfg = ModelConfig(vision=VisionConfig(kind="qwen", output_dim=256, n_queries=16, hidden_act="gelu"),
                      projection=ProjectionConfig("baseline"), compat="dsvc", mmca=False)
    path = tmp_path / "config.json"
    cfg.save(str(path))
    assert ModelConfig.load(str(path)) == cfg
    assert json.loads(path.read_text())["vision"]["kind"] == "qwen"


def test_validation_messages():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LLMConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="compat"):
        ModelConfig(compat="exact")
    with pytest.raises(ValueError, match="only supports the 'baseline'"):
        ModelConfig(vision=VisionConfig(kind="qwen", output_dim=256, n_queries=16), projection=ProjectionConfig("vit"))
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"llm": {"hidden": 3}})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("llama-9b")


def test_from_dsvc_meta(golden_dir):
    meta = json.load(open(f"{golden_dir}/qwen-mmca/meta.json"))
    cfg = ModelConfig.from_dsvc_meta(meta)
    assert cfg.vision.kind == "qwen" and cfg.vision.hidden_size == 48 and cfg.vision.output_dim == 256
    assert cfg.image_tokens == 16 and cfg.compat == "dsvc" and cfg.image_token_id == 95
    gqa = ModelConfig.from_dsvc_meta(json.load(open(f"{golden_dir}/baseline-mmca-gqa/meta.json")))
    assert gqa.llm.num_key_value_heads == 2 and gqa.image_tokens == 17
