// torch operators hf_comq_cpu::{packed_linear, dequantize, isa} over the loops of
// kernels_impl.h.  Registered with TORCH_LIBRARY rather than pybind11, so the
// extension builds from a few ATen headers and loads with torch.ops.load_library.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "isa_request.h"
#include "kernels.h"

namespace hf_comq {
namespace {

// Up to this many tokens the fused GEMV (weights decoded in registers, never stored)
// is fastest: a dequantized tile would be used by too few rows to pay for itself.
constexpr int64_t kMaxGemvTokens = 8;
// From this many tokens on, BLAS on dequantized tiles beats the packed micro-kernel:
// the dequantization is then a negligible share and BLAS's blocking wins.
constexpr int64_t kMinBlasTokens = 1024;
// The same, on CPUs with AVX-512: there the library GEMM (oneDNN, see onednn_linear) multiplies
// with 512-bit vectors, twice the micro-kernel's AVX2 width, and overtakes it after a few dozen tokens
// (benchmarks/bench_kernels.py --methods prints each method's time by token count).
constexpr int64_t kMinBlasTokensWideBlas = 64;
// Micro-kernel path: each task dequantizes at most kMaxTaskRows output features x
// kBlockK inputs into a buffer that stays in L2 while the token panels stream past.
constexpr int64_t kMaxTaskRows = 96;
constexpr int64_t kBlockK = 384;
// BLAS path: the transient fp32 tile holds at most this many weights.  A tile that
// stays in the L2 cache is cheap to write and for BLAS to read back, which is what a
// call with few tokens spends its time on; with many tokens each tile's product costs
// the packing of all of x again inside BLAS, so there the tiles are large and few.
constexpr int64_t kBlasTileWeights = int64_t{1} << 22;
constexpr int64_t kBlasSmallTileWeights = int64_t{1} << 18;
constexpr int64_t kBlasLargeTileTokens = 256;

enum class Method { kGemv, kTiles, kBlas };
enum class Isa { kAvx2, kScalar };

std::string isa() { return cpu_has_avx2_and_fma() ? "avx2" : "scalar"; }

int64_t min_blas_tokens() { return cpu_has_avx512f() ? kMinBlasTokensWideBlas : kMinBlasTokens; }

Isa choose_isa(const std::string& requested) {
  return avx2_requested(requested, cpu_has_avx2_and_fma(), "packed_linear", "lacks AVX2/FMA") ? Isa::kAvx2
                                                                                               : Isa::kScalar;
}

// The tile micro-kernel is written for AVX2; the portable build hands every product
// it cannot do as a GEMV to BLAS, which is vectorised on any CPU.
Method choose_method(const std::string& requested, int64_t tokens, Isa isa) {
  if (requested == "auto") {
    if (tokens <= kMaxGemvTokens) return Method::kGemv;
    return tokens < min_blas_tokens() && isa == Isa::kAvx2 ? Method::kTiles : Method::kBlas;
  }
  if (requested == "gemv") return Method::kGemv;
  if (requested == "tiles") return Method::kTiles;
  TORCH_CHECK(requested == "blas", "hf_comq packed_linear: method must be auto, gemv, tiles or blas, got ", requested);
  return Method::kBlas;
}

const char* method_name(Method method) {
  switch (method) {
    case Method::kGemv:
      return "gemv";
    case Method::kTiles:
      return "tiles";
    case Method::kBlas:
      break;
  }
  return "blas";
}

// What method='auto' runs for this many tokens on this CPU (for the tests and benchmarks).
std::string auto_method(int64_t tokens) { return method_name(choose_method("auto", tokens, choose_isa("auto"))); }

// The loops of one instruction set, behind one switch.
struct Kernels {
  Isa isa;
  void gemv(const PackedWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t o_begin,
            int64_t o_end) const {
#if HF_COMQ_HAVE_AVX2_BUILDS
    if (isa == Isa::kAvx2) return avx2::gemv(w, x, m, bias, y, o_begin, o_end);
#endif
    scalar::gemv(w, x, m, bias, y, o_begin, o_end);
  }
  void dequantize(const PackedWeight& w, int64_t o_begin, int64_t o_end, int64_t k_begin, int64_t k_end, float* out,
                  int64_t ld) const {
#if HF_COMQ_HAVE_AVX2_BUILDS
    if (isa == Isa::kAvx2) return avx2::dequantize(w, o_begin, o_end, k_begin, k_end, out, ld);
#endif
    scalar::dequantize(w, o_begin, o_end, k_begin, k_end, out, ld);
  }
  void gemm_tile(const float* wt, int64_t rows, int64_t kc, const float* xp, int64_t k_offset, int64_t in_features,
                 int64_t m, float* y, int64_t ldy, int64_t n_valid, const float* bias, bool accumulate) const {
#if HF_COMQ_HAVE_AVX2_BUILDS
    if (isa == Isa::kAvx2)
      return avx2::gemm_tile(wt, rows, kc, xp, k_offset, in_features, m, y, ldy, n_valid, bias, accumulate);
#endif
    scalar::gemm_tile(wt, rows, kc, xp, k_offset, in_features, m, y, ldy, n_valid, bias, accumulate);
  }
};

PackedWeight describe(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                      int64_t in_features) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "hf_comq packed_linear: bits must be in 1..8, got ", bits);
  TORCH_CHECK(packed.device().is_cpu() && scale.device().is_cpu() && zero.device().is_cpu(),
              "hf_comq packed_linear: the CPU kernel needs CPU tensors");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kInt && packed.is_contiguous(),
              "hf_comq packed_linear: weight_packed must be a contiguous 2-D int32 tensor");
  TORCH_CHECK(packed.size(1) == (in_features * bits + 31) / 32, "hf_comq packed_linear: weight_packed has ",
              packed.size(1), " words per row, ", in_features, " codes of ", bits, " bits need ",
              (in_features * bits + 31) / 32);
  const int64_t out_features = packed.size(0);
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.size(0) == out_features,
              "hf_comq packed_linear: scale must be contiguous float32 (out_features, groups)");
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.is_contiguous() && zero.sizes() == scale.sizes(),
              "hf_comq packed_linear: zero must be contiguous uint8 shaped like scale");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(groups >= 1 && in_features % groups == 0, "hf_comq packed_linear: ", groups,
              " groups do not divide in_features=", in_features);
  const int64_t group_size = in_features / groups;
  TORCH_CHECK(groups == 1 || group_size % 8 == 0,
              "hf_comq packed_linear: the kernel needs group_size % 8 == 0, got ", group_size);
  return PackedWeight{reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>()),
                      packed.size(1) * 4,
                      scale.data_ptr<float>(),
                      zero.data_ptr<uint8_t>(),
                      out_features,
                      in_features,
                      groups,
                      group_size,
                      static_cast<int>(bits)};
}

// A thread pays for itself on a GEMV from a few hundred thousand weights to decode: the
// layers of a small LM (well under a million weights each) then run on every thread the
// caller gave torch, as torch's own linear layers do.  On a machine whose other cores are
// busy the extra threads wait for a core, as in any threaded torch op.
constexpr int64_t kMinGemvWeightsPerThread = int64_t{1} << 18;

void run_gemv(const Kernels& kernels, const PackedWeight& w, const float* x, int64_t m, const float* bias, float* y) {
  // Long runs of rows per thread: each streams its share of the packed weight once.
  const int64_t grain = std::max<int64_t>(64, (kMinGemvWeightsPerThread + w.in_features - 1) / std::max<int64_t>(w.in_features, 1));
  at::parallel_for(0, w.out_features, grain, [&](int64_t begin, int64_t end) {
    kernels.gemv(w, x, m, bias, y, begin, end);
  });
}

void run_tiles(const Kernels& kernels, const PackedWeight& w, const float* x, int64_t m, const float* bias, float* y) {
  const int64_t K = w.in_features, N = w.out_features;
  const int64_t panels = (m + kPanel - 1) / kPanel;
  std::vector<float> xp(static_cast<size_t>(panels * kPanel * K));
  pack_activations(x, m, K, xp.data());
  // Equal tasks, a multiple of the thread count where the features allow, each at
  // most kMaxTaskRows features: every thread then does the same amount of work.
  const int64_t threads = at::get_num_threads();
  const int64_t max_tasks = (N + kTileRows - 1) / kTileRows;
  int64_t tasks = (N + kMaxTaskRows - 1) / kMaxTaskRows;
  tasks = std::min(max_tasks, (tasks + threads - 1) / threads * threads);
  const int64_t task_rows = ((N + tasks - 1) / tasks + kTileRows - 1) / kTileRows * kTileRows;
  tasks = (N + task_rows - 1) / task_rows;
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    const int64_t kc_max = std::min(K, kBlockK);
    std::vector<float> tile(static_cast<size_t>(task_rows * kc_max), 0.0f);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t n0 = task * task_rows;
      const int64_t rows = std::min(task_rows, N - n0);
      const int64_t padded = (rows + kTileRows - 1) / kTileRows * kTileRows;
      for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
        const int64_t kc = std::min(kBlockK, K - k0);
        if (rows < padded) std::fill(tile.begin(), tile.end(), 0.0f);
        kernels.dequantize(w, n0, n0 + rows, k0, k0 + kc, tile.data(), kc);
        kernels.gemm_tile(tile.data(), padded, kc, xp.data(), k0, K, m, y + n0, N, rows, bias ? bias + n0 : nullptr,
                          k0 > 0);
      }
    }
  });
}

// oneDNN's float32 linear op (mkldnn::_linear_pointwise, the op torch's compiler emits for
// linear layers), when the CPU has AVX-512, this torch has the op and oneDNN is not turned off:
// torch's BLAS, MKL, takes its AVX2 code on AMD processors, oneDNN uses AVX-512 there too.  On a
// CPU without AVX-512 both run AVX2 code and MKL's is the faster (hf_comq/kernels/gemm.py,
// onednn_preferred, makes the same choice for the solver's products).  It reads a dequantized
// tile as it is laid out (out x in).
using LinearOp = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, std::string_view,
                            c10::List<std::optional<c10::Scalar>>, std::optional<std::string_view>);

const c10::TypedOperatorHandle<LinearOp>* onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearOp>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<LinearOp>> {
    const auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!found.has_value() || !at::hasMKLDNN()) return std::nullopt;
    try {
      return found->typed<LinearOp>();
    } catch (const c10::Error&) {  // another signature in another torch: BLAS then
      return std::nullopt;
    }
  }();
  return cpu_has_avx512f() && handle.has_value() && at::globalContext().userEnabledMkldnn() ? &*handle : nullptr;
}

// BLAS (or oneDNN) on dequantized tiles, one after the other, so that the library threads each product.
void run_blas(const Kernels& kernels, const PackedWeight& w, const at::Tensor& x,
              const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t K = w.in_features, N = w.out_features;
  const int64_t m = x.size(0);
  const int64_t tile_weights = m < kBlasLargeTileTokens ? kBlasSmallTileWeights : kBlasTileWeights;
  const int64_t tile_rows = std::min(N, std::max(kTileRows, tile_weights / std::max<int64_t>(K, 1)));
  at::Tensor tile = at::empty({tile_rows, K}, x.options());
  float* tile_data = tile.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, N - n0);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      kernels.dequantize(w, n0 + begin, n0 + end, 0, K, tile_data + begin * K, K);
    });
    at::Tensor out = y.narrow(1, n0, rows);
    if (const auto* linear = onednn_linear()) {
      const std::optional<at::Tensor> part_bias =
          bias.has_value() ? std::optional<at::Tensor>(bias->narrow(0, n0, rows)) : std::nullopt;
      out.copy_(linear->call(x, tile.narrow(0, 0, rows), part_bias, "none", c10::List<std::optional<c10::Scalar>>(),
                             std::nullopt));
      continue;
    }
    at::Tensor weight_t = tile.narrow(0, 0, rows).t();
    if (bias.has_value()) {
      at::addmm_out(out, bias->narrow(0, n0, rows), x, weight_t);
    } else {
      at::mm_out(out, x, weight_t);
    }
  }
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const at::Tensor& zero, const std::optional<at::Tensor>& bias, int64_t bits,
                         const std::string& method, const std::string& isa_name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "hf_comq packed_linear: x must be a contiguous 2-D float32 CPU tensor");
  const PackedWeight w = describe(packed, scale, zero, bits, x.size(1));
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                    bias->size(0) == w.out_features,
                "hf_comq packed_linear: bias must be contiguous float32 (out_features,)");
    bias_data = bias->data_ptr<float>();
  }
  const Kernels kernels{choose_isa(isa_name)};
  const int64_t m = x.size(0);
  const Method chosen = choose_method(method, m, kernels.isa);
  at::Tensor y = at::empty({m, w.out_features}, x.options());
  if (m == 0 || w.out_features == 0) return y;
  if (w.in_features == 0) return bias.has_value() ? y.copy_(bias->expand({m, w.out_features})) : y.zero_();
  switch (chosen) {
    case Method::kGemv:
      run_gemv(kernels, w, x.data_ptr<float>(), m, bias_data, y.data_ptr<float>());
      break;
    case Method::kTiles:
      run_tiles(kernels, w, x.data_ptr<float>(), m, bias_data, y.data_ptr<float>());
      break;
    case Method::kBlas:
      run_blas(kernels, w, x, bias, y);
      break;
  }
  return y;
}

at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                      int64_t in_features, const std::string& isa_name) {
  const PackedWeight w = describe(packed, scale, zero, bits, in_features);
  const Kernels kernels{choose_isa(isa_name)};
  at::Tensor out = at::empty({w.out_features, in_features}, scale.options());
  float* data = out.data_ptr<float>();
  at::parallel_for(0, w.out_features, 16, [&](int64_t begin, int64_t end) {
    kernels.dequantize(w, begin, end, 0, in_features, data + begin * in_features, in_features);
  });
  return out;
}

}  // namespace
}  // namespace hf_comq

TORCH_LIBRARY(hf_comq_cpu, m) {
  m.def(
      "packed_linear(Tensor x, Tensor weight_packed, Tensor scale, Tensor zero, Tensor? bias, int bits, "
      "str method='auto', str isa='auto') -> Tensor");
  m.def(
      "dequantize(Tensor weight_packed, Tensor scale, Tensor zero, int bits, int in_features, str isa='auto') "
      "-> Tensor");
  m.def("isa() -> str", &hf_comq::isa);
  m.def("auto_method(int tokens) -> str", &hf_comq::auto_method);
}

TORCH_LIBRARY_IMPL(hf_comq_cpu, CPU, m) {
  m.impl("packed_linear", &hf_comq::packed_linear);
  m.impl("dequantize", &hf_comq::dequantize);
}
