// How an operator's `isa` argument picks one of its builds: the one rule every operator
// with an AVX2 build follows (tests ask for each build to compare them).  Kept apart from
// cpu_features.h, which the AVX2 translation units include without torch's headers.
#pragma once

#include <c10/util/Exception.h>

#include <string>

namespace hf_comq {

// "auto": the AVX2 build where `cpu_runs_avx2`; "scalar": the plain build; "avx2": the AVX2
// build, refused where the CPU cannot run it (the message names `op` and, after "this CPU",
// what is missing).
inline bool avx2_requested(const std::string& isa, bool cpu_runs_avx2, const char* op, const char* lacking) {
  if (isa == "auto") return cpu_runs_avx2;
  if (isa == "scalar") return false;
  TORCH_CHECK(isa == "avx2", "hf_comq ", op, ": isa must be auto, avx2 or scalar, got ", isa);
  TORCH_CHECK(cpu_runs_avx2, "hf_comq ", op, ": isa=avx2 requested but this CPU ", lacking);
  return true;
}

// The builds of an operator that has an AVX-512 build besides the AVX2 and plain ones.
enum class Build { kScalar, kAvx2, kAvx512 };

// "auto": the widest build the CPU runs; "avx512", "avx2", "scalar": that build, refused
// where the CPU cannot run it (the message names `op`).
inline Build requested_build(const std::string& isa, bool cpu_runs_avx2, bool cpu_runs_avx512, const char* op) {
  if (isa == "auto") return cpu_runs_avx512 ? Build::kAvx512 : cpu_runs_avx2 ? Build::kAvx2 : Build::kScalar;
  if (isa == "scalar") return Build::kScalar;
  TORCH_CHECK(isa == "avx2" || isa == "avx512", "hf_comq ", op, ": isa must be auto, avx512, avx2 or scalar, got ", isa);
  const bool runs = isa == "avx2" ? cpu_runs_avx2 : cpu_runs_avx512;
  TORCH_CHECK(runs, "hf_comq ", op, ": isa=", isa, " requested but this CPU or build lacks ", isa == "avx2" ? "AVX2" : "AVX-512");
  return isa == "avx2" ? Build::kAvx2 : Build::kAvx512;
}

}  // namespace hf_comq
