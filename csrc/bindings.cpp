// The one Python module, dgemma._C. Each domain registers its functions; tensors arrive as torch.Tensor
// objects whose attributes are read through Python into a TensorArg here, so no libtorch is linked.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>

#include "kernels/residual_norm_limits.h"
#include "ops/info.h"
#include "ops/norm.h"
#include "ops/registry.h"
#include "ops/tensor_arg.h"

namespace py = pybind11;

namespace dgemma {
namespace {

DType parse_dtype(const std::string& s) {
  if (s == "torch.float32") return DType::kFloat32;
  if (s == "torch.bfloat16") return DType::kBFloat16;
  if (s == "torch.float16") return DType::kFloat16;
  if (s == "torch.float8_e4m3fn") return DType::kFloat8E4M3;
  if (s == "torch.int32") return DType::kInt32;
  if (s == "torch.int64") return DType::kInt64;
  if (s == "torch.uint8") return DType::kUInt8;
  if (s == "torch.bool") return DType::kBool;
  return DType::kOther;
}

}  // namespace

namespace {

// torch's Tensor type and dtype objects, looked up once (then each conversion compares pointers instead of
// formatting and parsing strings). Never released: they live as long as the interpreter's torch module.
struct TorchObjects {
  PyObject* tensor_type = nullptr;
  std::vector<std::pair<PyObject*, DType>> dtypes;
};

const TorchObjects& torch_objects() {
  static const TorchObjects* objects = [] {
    py::module_ torch = py::module_::import("torch");
    auto* o = new TorchObjects;
    o->tensor_type = py::object(torch.attr("Tensor")).release().ptr();
    const std::pair<const char*, DType> names[] = {
        {"bfloat16", DType::kBFloat16}, {"float32", DType::kFloat32}, {"int64", DType::kInt64},
        {"float8_e4m3fn", DType::kFloat8E4M3}, {"int32", DType::kInt32}, {"bool", DType::kBool},
        {"uint8", DType::kUInt8}, {"float16", DType::kFloat16}};
    for (const auto& [name, dtype] : names) o->dtypes.emplace_back(py::object(torch.attr(name)).release().ptr(), dtype);
    return o;
  }();
  return *objects;
}

DType dtype_of(const py::handle& t, const TorchObjects& o) {
  py::object dtype = t.attr("dtype");
  for (const auto& [object, id] : o.dtypes)
    if (dtype.ptr() == object) return id;
  return parse_dtype(py::str(dtype).cast<std::string>());
}

}  // namespace

TensorArg to_arg(const py::handle& t, const char* name) {
  // NOTE: this runs for every tensor of every launch, so it stays on cheap attribute reads (~1 us each).
  const TorchObjects& o = torch_objects();
  const int is_tensor = PyObject_IsInstance(t.ptr(), o.tensor_type);
  if (is_tensor != 1) {
    if (is_tensor < 0) PyErr_Clear();
    throw std::invalid_argument(std::string(name) + " must be a torch.Tensor, got " +
                                py::str(py::type::of(t)).cast<std::string>());
  }
  TensorArg a;
  a.name = name;
  a.data = reinterpret_cast<void*>(t.attr("data_ptr")().cast<std::uintptr_t>());
  a.dtype = dtype_of(t, o);
  a.shape = t.attr("shape").cast<std::vector<int64_t>>();
  a.strides = t.attr("stride")().cast<std::vector<int64_t>>();
  a.device = t.attr("is_cuda").cast<bool>() ? t.attr("get_device")().cast<int>() : -1;
  return a;
}

const TensorArg* optional_arg(const py::handle& t, const char* name, TensorArg& slot) {
  if (t.is_none()) return nullptr;
  slot = to_arg(t, name);
  return &slot;
}

namespace {

void register_info(py::module_& m) {
  m.def("version", [] { return std::string(DGEMMA_VERSION); }, "Version of the compiled extension.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build.");
  m.def("cuda_runtime_version", &cuda_runtime_version,
        "CUDART_VERSION the extension was compiled against (e.g. 13000), 0 without CUDA.");
  m.def(
      "device_capability",
      [](int device) {
        DeviceCapability c = device_capability(device);
        return py::make_tuple(c.major, c.minor, c.multiprocessors);
      },
      py::arg("device") = 0, "(major, minor, multiprocessor count) of a CUDA device.");
}

void register_norm(py::module_& m) {
  m.def("ffn_residual_experts_unsupported", &kernels::expert_branches_unsupported, py::arg("hidden"),
        "Why ffn_residual_experts cannot sum the expert rows of this hidden size, or '' when it can.");
  m.def(
      "rms_norm",
      [](py::handle x, py::handle weight, py::handle out, double eps, std::uintptr_t stream) {
        TensorArg weight_slot;
        rms_norm(to_arg(x, "x"), optional_arg(weight, "weight", weight_slot), to_arg(out, "out"), eps, stream);
      },
      py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("eps"), py::arg("stream"));
  m.def(
      "rms_norm_fp8",
      [](py::handle x, py::handle weight, py::handle q, py::handle scale, double eps, std::uintptr_t stream) {
        TensorArg weight_slot;
        rms_norm_fp8(to_arg(x, "x"), optional_arg(weight, "weight", weight_slot), to_arg(q, "q"),
                     to_arg(scale, "scale"), eps, stream);
      },
      py::arg("x"), py::arg("weight"), py::arg("q"), py::arg("scale"), py::arg("eps"), py::arg("stream"),
      "The input of an FP8 GEMM in one pass: q (float8_e4m3fn [rows, d]) and scale (fp32 [rows]) quantise "
      "rms_norm(x)*weight per row, bit-identical to rms_norm then fp8_quantize_rows.");
  m.def(
      "residual_norm",
      [](py::handle x, py::handle a, py::handle b, py::handle wa, py::handle wb, py::handle wc, py::handle scalar,
         py::handle out, double eps, std::uintptr_t stream, py::handle q_weight, py::handle q, py::handle q_scale) {
        TensorArg b_slot, wb_slot, wc_slot, scalar_slot, qw_slot, q_slot, qs_slot;
        residual_norm(to_arg(x, "x"), to_arg(a, "a"), optional_arg(b, "b", b_slot), to_arg(wa, "wa"),
                      optional_arg(wb, "wb", wb_slot), optional_arg(wc, "wc", wc_slot),
                      optional_arg(scalar, "scalar", scalar_slot), to_arg(out, "out"), eps, stream,
                      optional_arg(q_weight, "q_weight", qw_slot), optional_arg(q, "q", q_slot),
                      optional_arg(q_scale, "q_scale", qs_slot));
      },
      py::arg("x"), py::arg("a"), py::arg("b"), py::arg("wa"), py::arg("wb"), py::arg("wc"), py::arg("scalar"),
      py::arg("out"), py::arg("eps"), py::arg("stream"), py::arg("q_weight") = py::none(), py::arg("q") = py::none(),
      py::arg("q_scale") = py::none(),
      "A layer's residual update in one pass: out = x + rms_norm(a)*wa, or with b, wb, wc and scalar: "
      "out = (x + rms_norm(rms_norm(a)*wa + rms_norm(b)*wb)*wc) * scalar (each step rounded to x's dtype). "
      "With q and q_scale (bfloat16) it also writes the FP8 rows of rms_norm(out)*q_weight (the next GEMM's "
      "input), as rms_norm_fp8 would.");
  m.def(
      "embed_norm",
      [](py::handle ids, py::handle table, double scale, py::handle add, py::handle out, double eps,
         std::uintptr_t stream, py::handle q_weight, py::handle q, py::handle q_scale) {
        TensorArg add_slot, qw_slot, q_slot, qs_slot;
        embed_norm(to_arg(ids, "ids"), to_arg(table, "table"), scale, optional_arg(add, "add", add_slot),
                   to_arg(out, "out"), eps, stream, optional_arg(q_weight, "q_weight", qw_slot),
                   optional_arg(q, "q", q_slot), optional_arg(q_scale, "q_scale", qs_slot));
      },
      py::arg("ids"), py::arg("table"), py::arg("scale"), py::arg("add"), py::arg("out"), py::arg("eps"),
      py::arg("stream"), py::arg("q_weight") = py::none(), py::arg("q") = py::none(), py::arg("q_scale") = py::none(),
      "The decoder's input in one pass: out = rms_norm(table[ids]*scale [+ add]) (no weight), rounded as the "
      "reference's embed, add and norm; with q and q_scale also the FP8 rows of rms_norm(out)*q_weight.");
  m.def(
      "ffn_residual_experts",
      [](py::handle x, py::handle down, py::handle row_of, int top_k, py::handle w_mlp, py::handle w_moe,
         py::handle w_ff, py::handle scalar, py::handle out, double eps, std::uintptr_t stream, py::handle q_weight,
         py::handle q, py::handle q_scale) {
        TensorArg qw_slot, q_slot, qs_slot;
        ffn_residual_experts(to_arg(x, "x"), to_arg(down, "down"), to_arg(row_of, "row_of"), top_k,
                             to_arg(w_mlp, "w_mlp"), to_arg(w_moe, "w_moe"), to_arg(w_ff, "w_ff"),
                             to_arg(scalar, "scalar"), to_arg(out, "out"), eps, stream,
                             optional_arg(q_weight, "q_weight", qw_slot), optional_arg(q, "q", q_slot),
                             optional_arg(q_scale, "q_scale", qs_slot));
      },
      py::arg("x"), py::arg("down"), py::arg("row_of"), py::arg("top_k"), py::arg("w_mlp"), py::arg("w_moe"),
      py::arg("w_ff"), py::arg("scalar"), py::arg("out"), py::arg("eps"), py::arg("stream"),
      py::arg("q_weight") = py::none(), py::arg("q") = py::none(), py::arg("q_scale") = py::none(),
      "residual_norm's feed-forward form reading its two branches from the expert pipeline before the combine "
      "(moe_fp8 with combine=False): the dense MLP's shared slots and the routed slots of row_of, summed as the "
      "combine would.");
}

}  // namespace
}  // namespace dgemma

PYBIND11_MODULE(_C, m) {
  m.doc() = "dgemma compiled kernels";
  dgemma::register_info(m);
  dgemma::register_norm(m);
  dgemma::register_moe(m);
  dgemma::register_attention(m);
  dgemma::register_vocab_head(m);
}
