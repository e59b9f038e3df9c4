// Picks the kernel table for this CPU once, and lets tests force another one.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

#include "kernel_api.h"

namespace amos_fused::cpu {
namespace {

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// False where kernels_avx512_bf16.cpp is built as the baseline's alias.
bool cpu_has_avx512_bf16() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const KernelTable* best_kernels() {
  if (cpu_has_avx512_bf16()) return &kernels_avx512_bf16();
  if (cpu_has_avx512()) return &kernels_avx512();
  return cpu_has_avx2() ? &kernels_avx2() : &kernels_default();
}

// The kernels AMOS_FUSED_CPU_CAPABILITY names (as set_cpu_capability takes it), else
// the best ones; a name that is unknown, or that this CPU cannot run, warns once.
const KernelTable* first_kernels() {
  const char* forced = std::getenv("AMOS_FUSED_CPU_CAPABILITY");
  if (forced == nullptr || std::string(forced).empty()) return best_kernels();
  const std::string name(forced);
  if (name == "default") return &kernels_default();
  if (name == "avx2" && cpu_has_avx2()) return &kernels_avx2();
  if (name == "avx512" && cpu_has_avx512()) return &kernels_avx512();
  if (name == "avx512_bf16" && cpu_has_avx512_bf16()) return &kernels_avx512_bf16();
  if (name != "best") {
    const bool known = name == "avx2" || name == "avx512" || name == "avx512_bf16";
    TORCH_WARN("amos_fused: AMOS_FUSED_CPU_CAPABILITY='", name, "' ",
               known ? "names kernels this CPU cannot run" :
                       "is not one of 'default', 'avx2', 'avx512', 'avx512_bf16' or 'best'",
               "; the best kernels for this CPU run");
  }
  return best_kernels();
}

// The kernels chosen at load (first_kernels, read once), which "best" restores.
const KernelTable* load_time_kernels() {
  static const KernelTable* const chosen = first_kernels();
  return chosen;
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{load_time_kernels()};
  return table;
}

}  // namespace

const KernelTable& active_kernels() { return *current().load(); }

std::string cpu_capability() { return active_kernels().name; }

void set_cpu_capability(const std::string& name) {
  if (name == "default") {
    current().store(&kernels_default());
  } else if (name == "avx2") {
    TORCH_CHECK_VALUE(cpu_has_avx2(), "amos_fused: cpu capability 'avx2' requested but this CPU lacks AVX2/FMA/F16C");
    current().store(&kernels_avx2());
  } else if (name == "avx512") {
    TORCH_CHECK_VALUE(cpu_has_avx512(), "amos_fused: cpu capability 'avx512' requested but this CPU lacks "
                      "AVX-512 F/BW/VL/DQ (or AVX2/FMA/F16C)");
    current().store(&kernels_avx512());
  } else if (name == "avx512_bf16") {
    TORCH_CHECK_VALUE(cpu_has_avx512_bf16(), "amos_fused: cpu capability 'avx512_bf16' requested but this CPU "
                      "lacks AVX512_BF16 (or AVX-512 F/BW/VL/DQ, AVX2/FMA/F16C)");
    current().store(&kernels_avx512_bf16());
  } else if (name == "best") {  // (the load-time choice: AMOS_FUSED_CPU_CAPABILITY's, else the widest)
    current().store(load_time_kernels());
  } else {
    TORCH_CHECK_VALUE(false, "amos_fused: unknown cpu capability '", name,
                      "' (expected 'default', 'avx2', 'avx512', 'avx512_bf16' or 'best')");
  }
}

}  // namespace amos_fused::cpu
