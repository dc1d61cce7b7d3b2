"""Quantised checkpoint formats: compressed-tensors FP8 (per channel, per tensor) and NVFP4 written by the
compressed-tensors library from tiny random transformers models, and a ModelOpt NVFP4 export written by
hand in ModelOpt's layout."""

import json
import os
import shutil

import pytest
from checkpoint_edits import edit_config as _edit_config
import torch
from hf_checkpoints import build_hf_model
from safetensors.torch import load_file, save_file

import dgemma
import dgemma.checkpoint
from dgemma.checkpoint import checkpoint_files, index_tensors
from dgemma.config import ModelConfig
from dgemma.formats import (
    CheckpointFormat,
    CompressedTensorsFp8,
    CompressedTensorsNvfp4,
    ModelOptNvfp4,
    detect_format,
    format_from_config,
)
from dgemma.quant import Fp8Weight
from dgemma.weights import expected_shapes, weight_map

ct = pytest.importorskip("compressed_tensors")

# The modules llm-compressor's usual recipes leave dense (the router, self-conditioning, the vision tower).
IGNORE = ["lm_head", "re:.*vision.*", "re:.*router.*", "re:.*self_conditioning.*"]
# NVFP4 blocks are 16 inputs: every Linear's input width must divide by 16 (48, 64, 4x12 and 4x20 heads).
NVFP4_DIMS = dict(hidden_size=48, intermediate_size=64)


def _fp8_scheme(strategy):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False),
        input_activations=QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True,
                                           dynamic=True))


def _calibrate_weights(model):
    """The weight observers' job in llm-compressor (min/max per channel, tensor or 16-block group, and the
    NVFP4 global scale), done with compressed-tensors' own qparam functions."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    with torch.no_grad():
        for _, m in model.named_modules():
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            w, args = m.weight.float(), scheme.weights
            if args.strategy == "channel":
                scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
            elif args.strategy == "tensor":
                scale, _ = calculate_qparams(w.amin().reshape(1), w.amax().reshape(1), args)
            else:  # tensor_group (NVFP4)
                gs = generate_gparam(w.amin(), w.amax())
                m.weight_global_scale.copy_(gs)
                g = w.unflatten(-1, (-1, args.group_size))
                scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
            m.weight_scale.copy_(scale.to(m.weight_scale.dtype))
            if hasattr(m, "input_global_scale"):  # calibrated on activations in llm-compressor; unused by dgemma
                m.input_global_scale.copy_(generate_gparam(torch.tensor(-4.0), torch.tensor(4.0)))


def write_ct_checkpoint(path, scheme, *, dims=None, ignore=IGNORE, seed=0):
    """Quantise a random tiny model with compressed-tensors and save it the way llm-compressor does."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    model = build_hf_model("odd", seed=seed, text_overrides=dims).to(torch.bfloat16)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    _calibrate_weights(model)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return path


@pytest.fixture(scope="module")
def fp8_channel(tmp_path_factory):
    return write_ct_checkpoint(tmp_path_factory.mktemp("fp8_channel"), _fp8_scheme("channel"))


@pytest.fixture(scope="module")
def fp8_tensor(tmp_path_factory):
    return write_ct_checkpoint(tmp_path_factory.mktemp("fp8_tensor"), _fp8_scheme("tensor"), seed=3)


@pytest.fixture(scope="module")
def nvfp4(tmp_path_factory):
    from compressed_tensors.quantization import preset_name_to_scheme

    return write_ct_checkpoint(tmp_path_factory.mktemp("nvfp4"), preset_name_to_scheme("NVFP4", ["Linear"]),
                               dims=NVFP4_DIMS, seed=5)


# -- ModelOpt NVFP4, written by hand -----------------------------------------------------------------

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _modelopt_quantize(w):
    """ModelOpt's NVFP4QTensor.quantize: weight_scale_2 = amax / (6 * 448); per 16-block scale =
    block amax / (6 * weight_scale_2) as E4M3; values rounded to the nearest E2M1 (ties to even code);
    codes packed two per byte, even column in the low nibble."""
    w = w.float()
    scale_2 = w.abs().amax() / (6.0 * 448.0)
    blocks = w.view(w.shape[0], -1, 16)
    block_scale = (blocks.abs().amax(-1) / (6.0 * scale_2)).to(torch.float8_e4m3fn)
    scaled = blocks / (block_scale.float() * scale_2).unsqueeze(-1)
    idx = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(-1).to(torch.uint8)
    codes = (idx | ((scaled < 0).to(torch.uint8) << 3)).view(w.shape)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), block_scale, scale_2.reshape(())


def write_modelopt_checkpoint(path, *, seed=7, exclude=("lm_head", "*router*", "*self_conditioning*",
                                                        "*vision_tower*", "*embed_vision*"), nested=False):
    """A tiny model exported in ModelOpt's unified Hugging Face layout: ``weight`` U8 packed, ``weight_scale``
    E4M3 [out, in/16], ``weight_scale_2`` F32 scalar, ``input_scale`` F32 scalar."""
    import fnmatch

    model = build_hf_model("odd", seed=seed, text_overrides=NVFP4_DIMS).to(torch.bfloat16)
    model.save_pretrained(path)
    tensors = load_file(f"{path}/model.safetensors")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for module in sorted(linears):
        key = module + ".weight"
        if key not in tensors or any(fnmatch.fnmatchcase(module, p) for p in exclude):
            continue
        packed, block_scale, scale_2 = _modelopt_quantize(tensors[key])
        tensors[key] = packed
        tensors[module + ".weight_scale"] = block_scale
        tensors[module + ".weight_scale_2"] = scale_2
        tensors[module + ".input_scale"] = torch.tensor(0.01)
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    quant = {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None, "exclude_modules": list(exclude)}
    if nested:
        with open(f"{path}/hf_quant_config.json", "w") as f:
            json.dump({"producer": {"name": "modelopt", "version": "0.37.0"}, "quantization": quant}, f)
    else:
        _edit_config(path, lambda c: c.__setitem__("quantization_config", {
            "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": list(exclude)}))
    return path


@pytest.fixture(scope="module")
def modelopt(tmp_path_factory):
    return write_modelopt_checkpoint(tmp_path_factory.mktemp("modelopt"))


# -- helpers ---------------------------------------------------------------------------------------


def _copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(f"{dst}/model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        _edit_config(dst, edit_config)
    return dst


def _plan(path):
    """(format, plan, tensors as stored) of a checkpoint, through dgemma's header reader."""
    cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
    fmt = detect_format(str(path))
    plan = fmt.plan(expected_shapes(cfg), index_tensors(checkpoint_files(str(path))))
    return cfg, fmt, plan


def _built(path, dtype=torch.float32):
    cfg, fmt, plan = _plan(path)
    raw = load_file(f"{path}/model.safetensors")
    specs = weight_map(cfg)
    return raw, {n: fmt.build(s, {k: raw[k] for k in s.keys}, dtype=dtype, keep_fp8=specs[n].quantized)
                 for n, s in plan.items()}


def _dense_twin(src, dst, weights):
    """A dense fp32 checkpoint holding ``weights`` (dequantised, by name) and every other tensor of
    ``src`` as stored, with the quantisation config removed: the model the quantised one must equal."""
    shutil.copytree(src, dst)
    raw = load_file(f"{src}/model.safetensors")
    extras = {"weight_scale", "input_scale", "weight_packed", "weight_global_scale", "input_global_scale",
              "weight_scale_2"}
    tied = ("model.encoder.language_model.layers.", "lm_head.")  # copies dgemma skips
    out = {k: v.float() for k, v in raw.items() if k.rpartition(".")[2] not in extras
           and (not k.startswith(tied) or k.endswith("layer_scalar")) and k not in weights}
    for name, w in weights.items():
        out[name] = w.dequantize(torch.float32) if isinstance(w, Fp8Weight) else w.float()
    save_file(out, f"{dst}/model.safetensors", metadata={"format": "pt"})
    _edit_config(dst, lambda c: c.pop("quantization_config", None))
    if os.path.exists(f"{dst}/hf_quant_config.json"):
        os.remove(f"{dst}/hf_quant_config.json")
    return dst


def _logits(eng, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, eng.config.vocab_size, (2, 9), generator=g)
    canvas = torch.randint(3, eng.config.vocab_size, (2, eng.config.canvas_length), generator=g)
    return eng.denoise(eng.encode(prompt), canvas)


# -- detection -------------------------------------------------------------------------------------


def test_detects_each_format(fp8_channel, fp8_tensor, nvfp4, modelopt, tmp_path):
    assert type(detect_format(str(fp8_channel))) is CompressedTensorsFp8
    assert type(detect_format(str(fp8_tensor))) is CompressedTensorsFp8
    assert type(detect_format(str(nvfp4))) is CompressedTensorsNvfp4
    assert type(detect_format(str(modelopt))) is ModelOptNvfp4
    nested = write_modelopt_checkpoint(tmp_path / "nested", nested=True)
    fmt = detect_format(str(nested))
    assert type(fmt) is ModelOptNvfp4 and "lm_head" in fmt.ignore
    dense = _copy(fp8_channel, tmp_path / "dense", edit_config=lambda c: c.pop("quantization_config"))
    assert type(detect_format(str(dense))) is CheckpointFormat
    # The ignore list compressed-tensors writes names every module left dense, encoder's tied copies too.
    fmt = detect_format(str(fp8_channel))
    assert fmt.is_ignored("model.decoder.layers.0.router.proj") and fmt.is_ignored("lm_head")
    assert not fmt.is_ignored("model.decoder.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "gptq", "bits": 4},
     r"quantization_config quant_method 'gptq' is not supported \(expected compressed-tensors FP8/NVFP4 or "
     r"modelopt NVFP4\)"),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, r"quant_algo 'FP8' is not supported"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 32}, r"group_size 32 is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}}}},
     r"config_groups.group_0 format 'pack-quantized' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "block"}}}},
     r"group_0.weights strategy 'block' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "naive-quantized",
      "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}},
     r"'naive-quantized' with 8-bit int weights is not supported"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "frozen",
      "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
     r"quantization_status 'frozen' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "mixed-precision", "config_groups": {
        "a": {"format": "float-quantized", "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}},
        "b": {"format": "nvfp4-pack-quantized", "weights": {"num_bits": 4, "type": "float", "group_size": 16,
                                                             "strategy": "tensor_group"}}}},
     r"mixes FP8 and NVFP4 config_groups"),
])
def test_unsupported_schemes_refused_by_name(qc, match):
    with pytest.raises(dgemma.ConfigError, match=match):
        format_from_config(qc, "ck/config.json")


def test_naive_quantized_fp8_is_fp8():
    qc = {"quant_method": "compressed-tensors", "format": "naive-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}}
    assert type(format_from_config(qc, "config.json")) is CompressedTensorsFp8


# -- what compressed-tensors writes, and what dgemma makes of it -------------------------------------


def test_compressed_tensors_leaves_experts_and_ignored_modules_dense(fp8_channel, nvfp4):
    for path in (fp8_channel, nvfp4):
        raw = load_file(f"{path}/model.safetensors")
        for key in ("model.decoder.layers.0.experts.gate_up_proj", "model.decoder.layers.0.experts.down_proj",
                    "model.decoder.layers.0.router.proj.weight", "model.decoder.self_conditioning.up_proj.weight"):
            assert raw[key].dtype == torch.bfloat16, key
        assert not any(k.endswith("_scale") and ".experts." in k for k in raw)
    _, _, plan = _plan(fp8_channel)
    assert "model.decoder.layers.0.experts.gate_up_proj" not in plan
    assert "model.decoder.layers.1.self_attn.q_proj.weight" in plan
    assert "model.decoder.layers.1.self_attn.v_proj.weight" not in plan  # full attention: no v_proj


@pytest.mark.parametrize("which", ["fp8_channel", "fp8_tensor"])
def test_fp8_weights_land_bit_exact(which, request):
    path = request.getfixturevalue(which)
    raw, built = _built(path)
    assert len(built) == 4 * 7 - 2  # q, k, v (sliding layers only), o, gate, up, down per layer
    for name, w in built.items():
        assert isinstance(w, Fp8Weight), name
        stored_q, stored_scale = raw[name], raw[name + "_scale"]
        assert torch.equal(w.q.view(torch.uint8), stored_q.view(torch.uint8)), name
        assert w.scale.dtype == torch.float32 and w.scale.shape == (stored_q.shape[0],)
        assert torch.equal(w.scale, stored_scale.float().reshape(-1).expand(stored_q.shape[0])), name
        if which == "fp8_tensor":
            assert stored_scale.shape == (1,)
        else:
            assert stored_scale.shape == (stored_q.shape[0], 1)


def test_fp8_weights_dequantise_where_dgemma_keeps_them_dense(fp8_channel):
    cfg, fmt, plan = _plan(fp8_channel)
    raw = load_file(f"{fp8_channel}/model.safetensors")
    name = "model.decoder.layers.0.mlp.up_proj.weight"
    w = fmt.build(plan[name], {k: raw[k] for k in plan[name].keys}, dtype=torch.bfloat16, keep_fp8=False)
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, (raw[name].float() * raw[name + "_scale"].float()).to(torch.bfloat16))


def test_nvfp4_dequantises_as_compressed_tensors_does(nvfp4):
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    raw, built = _built(nvfp4)
    assert len(built) == 26
    for name, w in built.items():
        m = name[: -len("weight")]
        packed = raw[m + "weight_packed"]
        values = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        scale = raw[m + "weight_scale"].float() / raw[m + "weight_global_scale"]
        ref = (values.view(packed.shape[0], -1, 16) * scale.unsqueeze(-1)).reshape(values.shape)
        assert w.dtype == torch.float32 and torch.equal(w, ref), name


def test_modelopt_nvfp4_layout_round_trips(modelopt):
    cfg, fmt, plan = _plan(modelopt)
    raw, built = _built(modelopt)
    dense = build_hf_model("odd", seed=7, text_overrides=NVFP4_DIMS).to(torch.bfloat16).state_dict()
    assert len(built) == 26
    for name, w in built.items():
        ref = dense[name].float()
        # E2M1 keeps ~1 significant bit: the error is at most half a step of the block's scale (a swapped
        # nibble order or a wrong scale would be off by the weights' own size).
        m = name[: -len("weight")]
        step = (raw[m + "weight_scale"].float() * raw[m + "weight_scale_2"]).repeat_interleave(16, dim=1)
        assert ((w - ref).abs() <= step + 1e-6).all(), name
        assert (w - ref).norm() < 0.25 * ref.norm(), name


# -- malformed checkpoints -------------------------------------------------------------------------

Q = "model.decoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("which, edit, match", [
    ("fp8_channel", lambda t: t.__setitem__(Q + ".weight_scale", torch.ones(48, 2)),
     r"tensor '" + Q + r".weight_scale' has shape \[48, 2\], expected \[48, 1\] or \[1\]"),
    ("fp8_channel", lambda t: t.__setitem__(Q + ".weight_scale", torch.ones(48, 1, dtype=torch.int32)),
     r"tensor '" + Q + r".weight_scale' has dtype I32, expected F32 or BF16 or F16"),
    ("fp8_channel", lambda t: t.__setitem__(Q + ".weight", t[Q + ".weight"].float()),
     r"tensor '" + Q + r".weight' has dtype F32, expected F8_E4M3"),
    ("fp8_channel", lambda t: t.__setitem__("model.decoder.layers.0.experts.down_proj",
                                            t["model.decoder.layers.0.experts.down_proj"].to(torch.float8_e4m3fn)),
     r"tensor 'model.decoder.layers.0.experts.down_proj' is stored quantised \(dtype F8_E4M3\)"),
    # NVFP4
    ("nvfp4", lambda t: t.pop(Q + ".weight_global_scale"), r"missing tensor '" + Q + r".weight_global_scale'"),
    ("nvfp4", lambda t: t.__setitem__(Q + ".weight_scale", t[Q + ".weight_scale"][:, :2].contiguous()),
     r"tensor '" + Q + r".weight_scale' has shape \[48, 2\], expected \[48, 3\]"),
    ("nvfp4", lambda t: t.__setitem__(Q + ".weight_scale", t[Q + ".weight_scale"].float()),
     r"tensor '" + Q + r".weight_scale' has dtype F32, expected F8_E4M3"),
    ("nvfp4", lambda t: t.__setitem__(Q + ".weight_packed", t[Q + ".weight_packed"][:, :-1].contiguous()),
     r"tensor '" + Q + r".weight_packed' has shape \[48, 23\], expected \[48, 24\]"),
    ("nvfp4", lambda t: t.__setitem__(Q + ".weight", torch.zeros(48, 48)), r"has both a dense '" + Q + r".weight'"),
])
def test_malformed_quantised_tensors_refused_naming_the_tensor(which, edit, match, request, tmp_path):
    bad = _copy(request.getfixturevalue(which), tmp_path / "bad", edit_tensors=edit)
    with pytest.raises(dgemma.CheckpointError, match=match):
        _plan(bad)


def test_missing_fp8_scale_named(fp8_channel, tmp_path):
    bad = _copy(fp8_channel, tmp_path / "bad", edit_tensors=lambda t: t.pop(Q + ".weight_scale"))
    with pytest.raises(dgemma.CheckpointError, match=r"missing tensor '" + Q + r".weight_scale'"):
        _plan(bad)


def test_quantised_tensor_of_ignored_module_refused(fp8_channel, tmp_path):
    bad = _copy(fp8_channel, tmp_path / "bad", edit_config=lambda c: c["quantization_config"]["ignore"].append(Q))
    with pytest.raises(dgemma.CheckpointError, match=r"tensor '" + Q + r".weight' of module '" + Q + r"' is stored "
                       r"quantised \(compressed-tensors FP8\), but the module is in .*config.json's quantization "
                       r"ignore list"):
        _plan(bad)


def test_malformed_modelopt_refused_naming_the_tensor(modelopt, tmp_path):
    bad = _copy(modelopt, tmp_path / "bad", edit_tensors=lambda t: t.pop(Q + ".weight_scale_2"))
    with pytest.raises(dgemma.CheckpointError, match=r"missing tensor '" + Q + r".weight_scale_2'"):
        _plan(bad)
    bad2 = _copy(modelopt, tmp_path / "bad2", edit_config=lambda c: c["quantization_config"]["ignore"].append(
        "model.decoder.layers.*.self_attn.*"))
    with pytest.raises(dgemma.CheckpointError, match=r"is in .*quantization ignore list"):
        _plan(bad2)


def test_fp8_without_quantization_config_refused(fp8_channel, tmp_path):
    bad = _copy(fp8_channel, tmp_path / "bad", edit_config=lambda c: c.pop("quantization_config"))
    with pytest.raises(dgemma.CheckpointError, match=r"tensor '" + Q + r".weight' is stored quantised "
                       r"\(dtype F8_E4M3\); a dense checkpoint holds it dense .*config.json has no "
                       r"quantization_config"):
        _plan(bad)


def test_corrupt_scales_refused(fp8_channel, nvfp4, tmp_path):
    def nan_scale(t):
        t[Q + ".weight_scale"][3, 0] = float("nan")

    cfg, fmt, plan = _plan(_copy(fp8_channel, tmp_path / "a", edit_tensors=nan_scale))
    raw = load_file(f"{tmp_path}/a/model.safetensors")
    with pytest.raises(dgemma.CheckpointError, match=r"tensor '" + Q + r".weight_scale' \(FP8 weight scale\) holds "
                       r"a non-finite value at index \[3\]"):
        fmt.build(plan[Q + ".weight"], {k: raw[k] for k in plan[Q + ".weight"].keys}, dtype=torch.float32)


@pytest.mark.parametrize("which,key,edit,match", [
    ("fp8_channel", ".weight_scale", lambda t: t.__setitem__((2, 0), -t[2, 0]),
     r"\(FP8 weight scale\) holds -[0-9.e-]+ at index \[2\]: scales are non-negative"),
    ("fp8_channel", ".weight_scale", lambda t: t.zero_(), r"\(FP8 weight scale\) is all zero"),
    ("nvfp4", ".weight_global_scale", lambda t: t.zero_(),
     r"\(NVFP4 per-tensor scale\) holds 0 at index \[\]: scales are positive"),
    ("nvfp4", ".weight_global_scale", lambda t: t.fill_(1e-45),
     r"\(NVFP4 weight dequantised to torch.float32\) holds a non-finite value"),
])
def test_scales_that_are_negative_zero_or_overflow_are_refused(which, key, edit, match, request, tmp_path):
    def corrupt(tensors):
        edit(tensors[Q + key])

    cfg, fmt, plan = _plan(_copy(request.getfixturevalue(which), tmp_path / "a", edit_tensors=corrupt))
    raw = load_file(f"{tmp_path}/a/model.safetensors")
    with pytest.raises(dgemma.CheckpointError, match=match):
        fmt.build(plan[Q + ".weight"], {k: raw[k] for k in plan[Q + ".weight"].keys}, dtype=torch.float32)


# -- dgemma.load on quantised checkpoints ------------------------------------------------------------

@pytest.mark.parametrize("which", ["fp8_channel", "fp8_tensor"])
def test_load_fp8_uses_the_stored_weights(which, request, tmp_path):
    path = request.getfixturevalue(which)
    raw, built = _built(path)
    for quantization in (None, "fp8"):
        eng = dgemma.load(path, dtype=torch.float32, quantization=quantization)
        lw = eng.model.w.layers[0]
        q = lw.attn.q_proj
        assert isinstance(q, Fp8Weight)
        assert torch.equal(q.q.view(torch.uint8), raw[Q + ".weight"].view(torch.uint8))
        assert torch.equal(q.scale, built[Q + ".weight"].scale)
        # compressed-tensors leaves the experts dense: quantised online only when FP8 is asked for.
        assert isinstance(lw.experts_gate_up, Fp8Weight) == (quantization == "fp8")
        assert lw.router_proj.dtype == torch.float32 and eng.model.w.sc_up.dtype == torch.float32


@pytest.mark.parametrize("which", ["fp8_channel", "fp8_tensor"])
def test_load_fp8_logits_equal_the_dense_model_on_dequantised_weights(which, request, tmp_path):
    """Bound: the reference backend dequantises FP8 weights to fp32 and computes in fp32, which is what
    the dense fp32 model on the dequantised weights does, so the logits agree to fp32 rounding
    (|diff| <= 1e-5, observed 0)."""
    path = request.getfixturevalue(which)
    _, built = _built(path)
    twin = _dense_twin(path, tmp_path / "dense", built)
    quantised = _logits(dgemma.load(path, dtype=torch.float32), seed=2)
    dense = _logits(dgemma.load(twin, dtype=torch.float32), seed=2)
    assert torch.isfinite(quantised).all()
    torch.testing.assert_close(quantised, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["nvfp4", "modelopt"])
def test_load_nvfp4_logits_equal_the_dense_model_on_dequantised_weights(which, request, tmp_path):
    path = request.getfixturevalue(which)
    _, built = _built(path)
    eng = dgemma.load(path, dtype=torch.float32)
    assert not isinstance(eng.model.w.layers[0].attn.q_proj, Fp8Weight)
    assert torch.equal(eng.model.w.layers[0].attn.q_proj, built[Q + ".weight"])
    twin = _dense_twin(path, tmp_path / "dense", built)
    torch.testing.assert_close(_logits(eng, seed=3), _logits(dgemma.load(twin, dtype=torch.float32), seed=3),
                               rtol=0, atol=1e-5)


def test_load_online_fp8_still_quantises_dense_checkpoints(tmp_path):
    path = tmp_path / "dense"
    build_hf_model("odd", seed=1).to(torch.bfloat16).save_pretrained(path)
    eng = dgemma.load(path, dtype=torch.bfloat16, quantization="fp8")
    assert isinstance(eng.model.w.layers[0].attn.q_proj, Fp8Weight)
    assert isinstance(eng.model.w.layers[0].experts_down, Fp8Weight)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(Q + ".weight_scale"), r"missing tensor '" + Q + r".weight_scale'"),
    (lambda t: t.__setitem__(Q + ".weight_scale", torch.ones(48, 2)), r"'" + Q + r".weight_scale' has shape"),
    (lambda t: t.__setitem__("lm_head.weight_scale", torch.ones(1)), None),
    (lambda t: t.__setitem__("model.decoder.norm.weight_scale", torch.ones(1)),
     r"tensor 'model.decoder.norm.weight' is stored quantised \(tensor 'model.decoder.norm.weight_scale'\)"),
])
def test_load_refuses_malformed_fp8(fp8_channel, tmp_path, edit, match):
    bad = _copy(fp8_channel, tmp_path / "bad", edit_tensors=edit)
    if match is None:  # a scale of a tensor dgemma skips (the tied lm_head) is skipped with it
        dgemma.load(bad, dtype=torch.float32)
        return
    with pytest.raises(dgemma.CheckpointError, match=match):
        dgemma.load(bad, dtype=torch.float32)


def test_load_refuses_unknown_quant_method(fp8_channel, tmp_path):
    bad = _copy(fp8_channel, tmp_path / "bad",
                edit_config=lambda c: c.__setitem__("quantization_config", {"quant_method": "gptq", "bits": 4}))
    with pytest.raises(dgemma.ConfigError, match=r"config.json: quantization_config quant_method 'gptq' is not "
                       r"supported \(expected compressed-tensors FP8/NVFP4 or modelopt NVFP4\)"):
        dgemma.load(bad)


def test_load_reports_the_format_and_its_real_sizes(fp8_channel, caplog, tmp_path):
    """The FP8 checkpoint's weights count one byte per FP8 parameter plus fp32 scales, and the log line
    names the format and both sizes; the memory plan reads the same weight bytes."""
    with caplog.at_level("INFO", logger="dgemma"):
        eng = dgemma.load(fp8_channel, dtype=torch.float32)
    info = eng.info
    assert info.format == "compressed-tensors FP8"
    assert "compressed-tensors FP8 checkpoint" in caplog.text and "GiB on disk" in caplog.text
    files = [f for f in os.listdir(fp8_channel) if f.endswith(".safetensors")]
    assert info.disk_bytes == sum(os.path.getsize(os.path.join(fp8_channel, f)) for f in files)
    _, built = _built(fp8_channel)
    twin = dgemma.load(_dense_twin(fp8_channel, tmp_path / "dense", built), dtype=torch.float32).info
    assert twin.format == "dense" and twin.parameters == info.parameters
    # Every FP8 weight holds 1 + 4/in bytes per parameter instead of 4.
    fp8 = [w for w in (eng.model.w.layers[0].attn.q_proj, eng.model.w.layers[0].mlp_up)]
    saved = sum(w.q.numel() * 3 - w.scale.numel() * 4 for w in fp8)
    assert saved > 0 and info.weight_bytes < twin.weight_bytes
    assert eng.memory_plan(1, 64).weights == info.weight_bytes


def test_sharded_fp8_loads_and_mixed_formats_across_shards_are_refused(fp8_channel, tmp_path):
    """The FP8 checkpoint split over two shards loads to the same logits; a second shard that holds one
    layer's weight in another format (NVFP4's packed layout) is refused, naming the tensor."""
    tensors = load_file(f"{fp8_channel}/model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2

    def write(dst, parts):
        shutil.copytree(fp8_channel, dst)
        os.remove(f"{dst}/model.safetensors")
        weight_map, total = {}, 0
        for i, part in enumerate(parts):
            name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            save_file(part, f"{dst}/{name}", metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
            total += sum(t.numel() * t.element_size() for t in part.values())
        with open(f"{dst}/model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
        return dst

    sharded = write(tmp_path / "sharded", [{k: tensors[k] for k in names[:half]},
                                           {k: tensors[k] for k in names[half:]}])
    whole, split = dgemma.load(fp8_channel, dtype=torch.float32), dgemma.load(sharded, dtype=torch.float32)
    assert torch.equal(_logits(whole), _logits(split))
    q1 = "model.decoder.layers.1.self_attn.q_proj"
    out, inp = tensors[q1 + ".weight"].shape
    first = {k: tensors[k] for k in names[:half] if not k.startswith(q1 + ".")}
    second = {k: tensors[k] for k in names[half:] if not k.startswith(q1 + ".")}
    second.update({q1 + ".weight_packed": torch.zeros(out, inp // 2, dtype=torch.uint8),
                   q1 + ".weight_scale": torch.ones(out, inp // 8).to(torch.float8_e4m3fn),
                   q1 + ".weight_global_scale": torch.ones(1)})
    mixed = write(tmp_path / "mixed", [first, second])
    with pytest.raises(dgemma.CheckpointError, match=rf"model-00002-of-00002.safetensors: missing tensor "
                                                   rf"'{q1}.weight' \(compressed-tensors FP8"):
        dgemma.load(mixed, dtype=torch.float32)
