"""Every way a checkpoint can be wrong gets an error naming the file, key or shape."""

import pathlib
import shutil
import struct

import pytest
from checkpoint_edits import edit_config as _edit_config
import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma.random_checkpoint import write_random_checkpoint


@pytest.fixture()
def ckpt(tmp_path):
    return write_random_checkpoint(tmp_path / "ck", "tiny", seed=1)


def _rewrite_tensors(path, fn):
    f = f"{path}/model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_missing_directory(tmp_path):
    with pytest.raises(dgemma.CheckpointError, match=r"checkpoint directory not found: .*nope"):
        dgemma.load(tmp_path / "nope")


def test_missing_config(ckpt):
    shutil.os.remove(f"{ckpt}/config.json")
    with pytest.raises(dgemma.ConfigError, match=r"config file not found: .*config.json"):
        dgemma.load(ckpt)


def test_config_not_json(ckpt):
    with open(f"{ckpt}/config.json", "w") as f:
        f.write("{ not json")
    with pytest.raises(dgemma.ConfigError, match=r"config.json: not valid JSON"):
        dgemma.load(ckpt)


def test_wrong_model_type(ckpt):
    _edit_config(ckpt, lambda c: c.update(model_type="gemma3"))
    with pytest.raises(dgemma.ConfigError, match=r"model_type is 'gemma3', expected 'diffusion_gemma'"):
        dgemma.load(ckpt)


@pytest.mark.parametrize("key,value,message", [
    ("hidden_size", -4, r"text_config.hidden_size = -4, expected a positive integer"),
    ("num_attention_heads", "8", r"text_config.num_attention_heads = '8', expected an integer"),
    ("hidden_activation", "relu", r"hidden_activation 'relu' is not supported"),
    ("top_k_experts", 99, r"top_k_experts = 99 exceeds num_experts = 8"),
    ("layer_types", ["sliding_attention"], r"layer_types must list 6 entries"),
    ("sliding_window", 1, r"sliding_window = 1, expected at least 2"),
    ("use_bidirectional_attention", "all", r"use_bidirectional_attention = 'all' is not supported"),
])
def test_invalid_text_config(ckpt, key, value, message):
    _edit_config(ckpt, lambda c: c["text_config"].update({key: value}))
    with pytest.raises(dgemma.ConfigError, match=message):
        dgemma.load(ckpt)


def test_missing_text_config_field(ckpt):
    _edit_config(ckpt, lambda c: c["text_config"].pop("vocab_size"))
    with pytest.raises(dgemma.ConfigError, match=r"text_config.vocab_size is missing"):
        dgemma.load(ckpt)


def test_no_weights(ckpt):
    shutil.os.remove(f"{ckpt}/model.safetensors")
    with pytest.raises(dgemma.CheckpointError, match=r"no model.safetensors or model.safetensors.index.json"):
        dgemma.load(ckpt)


def test_missing_shard(tmp_path):
    path = write_random_checkpoint(tmp_path / "sh", "tiny", shards=3)
    shutil.os.remove(f"{path}/model-00002-of-00003.safetensors")
    with pytest.raises(dgemma.CheckpointError, match=r"missing shard model-00002-of-00003.safetensors"):
        dgemma.load(path)


def test_truncated_file(ckpt):
    f = f"{ckpt}/model.safetensors"
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) - 1000])
    with pytest.raises(dgemma.CheckpointError, match=r"model.safetensors: truncated: tensor '.*' needs bytes up to"):
        dgemma.load(ckpt)


def test_empty_file(ckpt):
    open(f"{ckpt}/model.safetensors", "wb").close()
    with pytest.raises(dgemma.CheckpointError, match=r"truncated safetensors file \(0 bytes"):
        dgemma.load(ckpt)


def test_corrupt_header_length(ckpt):
    f = f"{ckpt}/model.safetensors"
    data = bytearray(open(f, "rb").read())
    data[:8] = struct.pack("<Q", 1 << 40)
    open(f, "wb").write(bytes(data))
    with pytest.raises(dgemma.CheckpointError, match=r"corrupt safetensors header \(declares 1099511627776"):
        dgemma.load(ckpt)


def test_corrupt_header_json(ckpt):
    f = f"{ckpt}/model.safetensors"
    data = bytearray(open(f, "rb").read())
    data[8:12] = b"\xff\xfe@@"
    open(f, "wb").write(bytes(data))
    with pytest.raises(dgemma.CheckpointError, match=r"corrupt safetensors header \(not valid JSON\)"):
        dgemma.load(ckpt)


def test_missing_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("model.decoder.layers.3.router.scale"))
    with pytest.raises(dgemma.CheckpointError, match=r"missing tensor 'model.decoder.layers.3.router.scale'"):
        dgemma.load(ckpt)


def test_missing_encoder_layer_scalar(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("model.encoder.language_model.layers.0.layer_scalar"))
    with pytest.raises(dgemma.CheckpointError, match=r"missing tensor 'model.encoder.language_model.layers.0.layer_"):
        dgemma.load(ckpt)


def test_unexpected_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.update({"model.decoder.layers.9.mlp.gate_proj.weight": torch.ones(2, 2)}))
    with pytest.raises(dgemma.CheckpointError, match=r"unexpected tensor 'model.decoder.layers.9.mlp.gate_proj.weight'"
                                                     r" \(shape \[2, 2\]\)"):
        dgemma.load(ckpt)


def test_wrong_shape(ckpt):
    key = "model.decoder.layers.2.self_attn.q_proj.weight"
    _rewrite_tensors(ckpt, lambda t: t.update({key: torch.ones(63, 64)}))
    with pytest.raises(dgemma.CheckpointError, match=rf"tensor '{key}' has shape \[63, 64\], expected \[64, 64\]"):
        dgemma.load(ckpt)


def test_unsupported_dtype(ckpt):
    key = "model.decoder.norm.weight"
    _rewrite_tensors(ckpt, lambda t: t.update({key: torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(dgemma.CheckpointError, match=rf"tensor '{key}' has unsupported dtype I32"):
        dgemma.load(ckpt)


def test_vision_tensors_ignored_with_notice(ckpt, caplog):
    _rewrite_tensors(ckpt, lambda t: t.update({"model.encoder.vision_tower.x.weight": torch.ones(3),
                                               "model.encoder.embed_vision.y.weight": torch.ones(3)}))
    with caplog.at_level("WARNING", logger="dgemma"):
        eng = dgemma.load(ckpt)
    assert "ignoring 2 vision-tower tensors" in caplog.text
    assert eng.config.num_layers == 6


def test_unsupported_load_arguments(ckpt):
    with pytest.raises(dgemma.DgemmaError, match=r"dtype torch.float16 is not supported"):
        dgemma.load(ckpt, dtype=torch.float16)
    with pytest.raises(dgemma.DgemmaError, match=r"device 'tpu' is not a valid torch device|not supported"):
        dgemma.load(ckpt, device="tpu")
    with pytest.raises(dgemma.DgemmaError, match=r"backend 'fast' is not one of reference, cuda"):
        dgemma.load(ckpt, backend="fast")


def test_cuda_backend_unavailable_is_clear(ckpt):
    from dgemma import _ext

    if _ext.cuda_status() is None:
        pytest.skip("CUDA is available here")
    with pytest.raises(dgemma.BackendUnavailableError, match=r"backend 'cuda' is unavailable: "):
        dgemma.load(ckpt, backend="cuda")


def test_default_dtype_follows_checkpoint(tmp_path):
    bf = write_random_checkpoint(tmp_path / "bf", "tiny", dtype=torch.bfloat16)
    assert dgemma.load(bf).dtype == torch.bfloat16
    fp = write_random_checkpoint(tmp_path / "fp", "tiny", dtype=torch.float32)
    assert dgemma.load(fp).dtype == torch.float32


def test_weights_are_private_copies_not_views_of_the_file(ckpt):
    """After load the weights own their memory (no mapping of the file): see test_hardening for the file
    being truncated or overwritten afterwards."""
    eng = dgemma.load(ckpt, dtype=torch.float32)
    a, b = eng.model.w.embed, eng.model.w.final_norm
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    eng16 = dgemma.load(ckpt, dtype=torch.bfloat16)
    assert eng16.model.w.embed.dtype == torch.bfloat16


def test_zero_padded_per_layer_config_keys_are_layer_indices(ckpt):
    """transformers 5.23 writes per_layer_config keys zero-padded ("05", "11": they sort as numbers) and reads them
    back; so does dgemma. Two keys naming one layer are refused."""
    import json

    base = dgemma.load(ckpt).config
    full = [s for s in base.layers if not s.is_sliding]
    plc = {f"{s.index:02d}": {"head_dim": s.head_dim, "num_key_value_heads": s.num_kv_heads} for s in full}
    _edit_config(ckpt, lambda c: c["text_config"].update(per_layer_config=plc))
    assert json.loads(pathlib.Path(ckpt, "config.json").read_text())["text_config"]["per_layer_config"] == plc
    assert dgemma.load(ckpt).config.layers == base.layers
    one = next(iter(plc.values()))
    _edit_config(ckpt, lambda c: c["text_config"].update(per_layer_config={"1": one, "01": one}))
    with pytest.raises(dgemma.ConfigError, match=r"per_layer_config keys '1' and '01' name the same layer 1"):
        dgemma.load(ckpt)
    _edit_config(ckpt, lambda c: c["text_config"].update(per_layer_config={" 1": one}))
    with pytest.raises(dgemma.ConfigError, match=r"per_layer_config key ' 1' is not a layer index"):
        dgemma.load(ckpt)


def test_tied_copies_are_skipped_only_when_they_are_copies(ckpt):
    """lm_head.weight and the encoder's text weights repeat the decoder's (DiffusionGemma ties them): an exact copy
    is skipped; a copy with other values (an untied fine-tune: logits off by 100 %) or of no decoder tensor is
    refused, naming it."""
    tensors = load_file(f"{ckpt}/model.safetensors")
    embed = "model.decoder.embed_tokens.weight"
    layer = next(k for k in tensors if k.startswith("model.decoder.layers.0.") and k.endswith(".weight"))
    copy = "model.encoder.language_model." + layer[len("model.decoder."):]
    _rewrite_tensors(ckpt, lambda t: t.update({"lm_head.weight": t[embed].clone(), copy: t[layer].clone()}))
    dgemma.load(ckpt)
    for key, value, message in (
            ("lm_head.weight", tensors[embed] + 1, r"tensor 'lm_head.weight' differs from "
                                                   r"'model.decoder.embed_tokens.weight'.* untied weights are not"),
            (copy, tensors[layer] * 2, rf"tensor '{copy}' differs from '{layer}'"),
            ("lm_head.weight", torch.zeros(7), r"unexpected tensor 'lm_head.weight' \(shape \[7\]\): it repeats no "
                                               r"tensor"),
            ("model.encoder.language_model.layers.77.bogus", torch.zeros(3),
             r"unexpected tensor 'model.encoder.language_model.layers.77")):
        _rewrite_tensors(ckpt, lambda t: t.update({"lm_head.weight": t[embed].clone(), copy: t[layer].clone(),
                                                   key: value}))
        with pytest.raises(dgemma.CheckpointError, match=message):
            dgemma.load(ckpt)
        _rewrite_tensors(ckpt, lambda t: t.pop(key))


def test_a_single_file_wins_over_a_stale_index(ckpt, caplog):
    """Saving unsharded over a sharded save leaves the old index behind: as transformers, the single file is
    loaded (the index's shards were refused as missing, or their old weights silently loaded)."""
    import json

    pathlib.Path(ckpt, "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.decoder.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with caplog.at_level("WARNING", logger="dgemma"):
        dgemma.load(ckpt)
    assert "loading model.safetensors, as transformers does" in caplog.text


def _fp8_checkpoint(path, *, encoder_input_scale=None, quantized_head=False):
    """A compressed-tensors FP8 (channel) checkpoint of the tiny preset; with ``encoder_input_scale`` the encoder's
    copies of the quantised linears too (same weight and weight scale, that activation scale), with
    ``quantized_head`` an FP8 lm_head."""
    import json

    from dgemma.weights import is_quantized_name

    write_random_checkpoint(path, "tiny", canvas_length=16, dtype=torch.bfloat16)
    tensors, out = load_file(f"{path}/model.safetensors"), {}

    def fp8(w):
        scale = w.float().abs().amax(1, keepdim=True) / 448.0
        return (w.float() / scale).to(torch.float8_e4m3fn), scale

    for k, w in tensors.items():
        if is_quantized_name(k) and w.dim() == 2:
            m = k[: -len(".weight")]
            out[k], out[m + ".weight_scale"] = fp8(w)
            out[m + ".input_scale"] = torch.tensor([0.02])
            if encoder_input_scale is not None:
                enc = "model.encoder.language_model." + m[len("model.decoder."):]
                out[enc + ".weight"], out[enc + ".weight_scale"] = out[k].clone(), out[m + ".weight_scale"].clone()
                out[enc + ".input_scale"] = torch.tensor([encoder_input_scale])
        else:
            out[k] = w
    if quantized_head:
        out["lm_head.weight"], out["lm_head.weight_scale"] = fp8(tensors["model.decoder.embed_tokens.weight"])
    save_file(out, f"{path}/model.safetensors", metadata={"format": "pt"})
    cfg = json.loads(pathlib.Path(path, "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": [], "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                                  "dynamic": False}}}}
    pathlib.Path(path, "config.json").write_text(json.dumps(cfg))
    return path


def test_quantised_tied_copies_load(tmp_path, caplog):
    """An FP8 checkpoint's encoder copies may carry their own calibrated activation scales (never used: not
    compared), and an FP8 lm_head stands for the embedding table dgemma uses (a warning says so)."""
    dgemma.load(_fp8_checkpoint(tmp_path / "a", encoder_input_scale=0.05))
    with caplog.at_level("WARNING", logger="dgemma"):
        dgemma.load(_fp8_checkpoint(tmp_path / "b", quantized_head=True))
    assert "stores lm_head quantised" in caplog.text


def test_a_cache_full_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(dgemma.CacheFullError("full", length=3, new_tokens=4, capacity=5)))
    assert isinstance(e, dgemma.CacheFullError) and str(e) == "full"
