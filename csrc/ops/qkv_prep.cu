#include <stdexcept>
#include <string>

#include "kernels/attention_tiles.cuh"
#include "kernels/qkv_prep.cuh"
#include "ops/attention.h"
#include "ops/attention_checks.h"

namespace dgemma {

using namespace attention_checks;

void qkv_prep(const TensorArg& q_in, const TensorArg& k_in, const TensorArg* v_in, const TensorArg& q_weight,
              const TensorArg& k_weight, const TensorArg& cos, const TensorArg& sin, const TensorArg& q_out,
              const TensorArg& k_out, const TensorArg& v_out, const TensorArg* cache_k, const TensorArg* cache_v,
              int64_t cache_start, int64_t ring_size, double eps, std::uintptr_t stream) {
  check_cuda(q_out);
  const int dev = q_out.device;
  check_bf16_rows(q_out, 4, dev);
  check_contiguous(q_out);
  const int64_t b = q_out.shape[0], t = q_out.shape[1], hq = q_out.shape[2], d = q_out.shape[3];
  if (d > (1 << 20) || !kernels::attention_head_dim_supported(static_cast<int>(d)))
    ::dgemma::throw_invalid("q_out head_dim " + std::to_string(d) + " is not supported (expected 256 or 512)");
  check_bf16_rows(k_out, 4, dev);
  check_contiguous(k_out);
  const int64_t hkv = k_out.shape[2];
  check_shape(k_out, {b, t, hkv, d});
  check_bf16_rows(v_out, 4, dev);
  check_contiguous(v_out);
  check_shape(v_out, {b, t, hkv, d});
  check_bf16_rows(q_in, 3, dev);
  check_shape(q_in, {b, t, hq * d});
  check_bf16_rows(k_in, 3, dev);
  check_shape(k_in, {b, t, hkv * d});
  if (v_in != nullptr) {
    check_bf16_rows(*v_in, 3, dev);
    check_shape(*v_in, {b, t, hkv * d});
  }
  for (const TensorArg* w : {&q_weight, &k_weight}) {
    check_bf16_rows(*w, 1, dev);
    check_shape(*w, {d});
  }
  for (const TensorArg* c : {&cos, &sin}) {
    check_bf16_rows(*c, 3, dev);
    if (c->shape[0] != 1 && c->shape[0] != b) check_shape(*c, {b, t, d});
    check_shape(*c, {c->shape[0], t, d});
  }
  if (cos.strides != sin.strides || cos.shape != sin.shape)
    ::dgemma::throw_invalid("cos and sin must have the same shape and strides");
  if (!(eps > 0.0)) ::dgemma::throw_invalid("eps must be positive, got " + std::to_string(eps));
  check_range("batch x tokens", b * t, 0, int64_t(1) << 31);
  if ((cache_k == nullptr) != (cache_v == nullptr))
    ::dgemma::throw_invalid("cache_k and cache_v must be given together");
  if (cache_k != nullptr) {
    check_bf16_rows(*cache_k, 4, dev);
    check_bf16_rows(*cache_v, 4, dev);
    const int64_t slots = cache_k->shape[2];
    check_shape(*cache_k, {b, hkv, slots, d});
    check_shape(*cache_v, {b, hkv, slots, d});
    check_range("ring_size", ring_size, 0, slots);
    check_range("cache_start", cache_start, 0, (int64_t(1) << 31) - 1 - t);
    if (ring_size == 0 && cache_start + t > slots)
      ::dgemma::throw_invalid("positions " + std::to_string(cache_start) + ".." +
                                  std::to_string(cache_start + t - 1) + " exceed the cache's " +
                                  std::to_string(slots) + " slots");
  }

  kernels::QkvPrepParams p{};
  p.q_in = static_cast<const __nv_bfloat16*>(q_in.data);
  p.k_in = static_cast<const __nv_bfloat16*>(k_in.data);
  p.v_in = v_in ? static_cast<const __nv_bfloat16*>(v_in->data) : nullptr;
  p.q_in_sb = q_in.strides[0], p.q_in_st = q_in.strides[1];
  p.k_in_sb = k_in.strides[0], p.k_in_st = k_in.strides[1];
  p.v_in_sb = v_in ? v_in->strides[0] : 0, p.v_in_st = v_in ? v_in->strides[1] : 0;
  p.q_weight = static_cast<const __nv_bfloat16*>(q_weight.data);
  p.k_weight = static_cast<const __nv_bfloat16*>(k_weight.data);
  p.cos = static_cast<const __nv_bfloat16*>(cos.data);
  p.sin = static_cast<const __nv_bfloat16*>(sin.data);
  p.cs_sb = cos.shape[0] == 1 ? 0 : cos.strides[0];
  p.cs_st = cos.strides[1];
  p.q_out = static_cast<__nv_bfloat16*>(q_out.data);
  p.k_out = static_cast<__nv_bfloat16*>(k_out.data);
  p.v_out = static_cast<__nv_bfloat16*>(v_out.data);
  if (cache_k != nullptr) {
    p.cache_k = static_cast<__nv_bfloat16*>(cache_k->data);
    p.cache_v = static_cast<__nv_bfloat16*>(cache_v->data);
    p.ck_sb = cache_k->strides[0], p.ck_sh = cache_k->strides[1], p.ck_ss = cache_k->strides[2];
    p.cv_sb = cache_v->strides[0], p.cv_sh = cache_v->strides[1], p.cv_ss = cache_v->strides[2];
  }
  p.cache_start = static_cast<int>(cache_start);
  p.ring_size = static_cast<int>(ring_size);
  p.batch = static_cast<int>(b), p.t = static_cast<int>(t), p.hq = static_cast<int>(hq), p.hkv = static_cast<int>(hkv);
  p.eps = static_cast<float>(eps);

  throw_if_failed(cudaSetDevice(dev), "cudaSetDevice");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  throw_if_failed(d == 256 ? kernels::qkv_prep_bf16<256>(p, s) : kernels::qkv_prep_bf16<512>(p, s), "qkv_prep launch");
}

}  // namespace dgemma
