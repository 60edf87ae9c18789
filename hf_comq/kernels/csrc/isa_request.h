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

}  // namespace hf_comq
