// The op amos_fused.stream_floor: the bandwidth floor of a fused step on CPU.
// It moves the bytes of one pass of an algorithm with trivial math, through the
// bucket loop and the instruction set of the step kernels, so that a step's time
// can be read against the time its memory traffic alone takes (the benchmark,
// amos_fused/bench.py).  A plain copy is no floor on CPU: it writes lines it has
// not read, which write-allocate caches fetch first.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kernel_api.h"
#include "stream_floor_api.h"

namespace amos_fused::cpu {
namespace {

constexpr const char* kOp = "amos_fused.stream_floor";
constexpr int64_t kMaxWritten = 4;
constexpr int64_t kMaxRead = 3;

// The kernel of the instruction set the step kernels run with.
StreamFloorFn active_stream_floor() {
  const std::string name = active_kernels().name;
  if (name == "avx512" || name == "avx512_bf16") return stream_floor_avx512();
  return name == "avx2" ? stream_floor_avx2() : stream_floor_default();
}

// No written tensor may share memory with any other tensor of the call (two read
// tensors may): the result would depend on the order of the writes.
void check_no_overlap(at::TensorList written, at::TensorList read) {
  struct Range {
    uintptr_t begin, end;
    bool written;
  };
  std::vector<Range> ranges;
  auto add = [&](at::TensorList list, bool is_written) {
    for (const at::Tensor& t : list) {
      if (t.numel() == 0) continue;
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      ranges.push_back({begin, begin + static_cast<uintptr_t>(t.numel() * t.element_size()), is_written});
    }
  };
  add(written, true);
  add(read, false);
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  uintptr_t end_any = 0, end_written = 0;  // the furthest end so far, of any range and of a written one
  for (const Range& r : ranges) {
    TORCH_CHECK_VALUE(r.begin >= end_written && (!r.written || r.begin >= end_any), kOp,
                      ": a written tensor shares memory with another tensor");
    end_any = std::max(end_any, r.end);
    if (r.written) end_written = std::max(end_written, r.end);
  }
}

// written: W·n tensors, read: R·n, both stream-major (stream k of tensor t at
// k·n + t); for every element of every tensor t, s = Σ_k read[k][t] and
// written[k][t] += s.
void stream_floor_cpu(at::TensorList written, at::TensorList read, int64_t num_tensors) {
  TORCH_CHECK_VALUE(num_tensors >= 1, kOp, ": num_tensors must be >= 1, got ", num_tensors);
  const int64_t n = num_tensors;
  const auto w_count = static_cast<int64_t>(written.size());
  const auto r_count = static_cast<int64_t>(read.size());
  TORCH_CHECK_VALUE(w_count % n == 0 && r_count % n == 0, kOp, ": ", w_count, " written and ", r_count,
                    " read tensors are not whole streams of ", n, " tensors");
  const int64_t W = w_count / n, R = r_count / n;
  TORCH_CHECK_VALUE(W >= 1 && W <= kMaxWritten, kOp, ": 1 to ", kMaxWritten, " written streams, got ", W);
  TORCH_CHECK_VALUE(R >= 1 && R <= kMaxRead, kOp, ": 1 to ", kMaxRead, " read streams, got ", R);
  const at::ScalarType dtype = written[0].scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                    kOp, ": dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  auto check = [&](const at::Tensor& t, int64_t index, const char* list) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, ": ", list, "[", index, "] is not on the CPU");
    TORCH_CHECK_VALUE(t.scalar_type() == dtype, kOp, ": ", list, "[", index, "] is ", t.scalar_type(),
                      ", written[0] is ", dtype);
    TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": ", list, "[", index, "] is not contiguous");
    TORCH_CHECK_VALUE(t.numel() == written[index % n].numel(), kOp, ": ", list, "[", index, "] has ",
                      t.numel(), " elements, written[", index % n, "] has ", written[index % n].numel());
  };
  for (int64_t i = 0; i < w_count; ++i) check(written[i], i, "written");
  for (int64_t i = 0; i < r_count; ++i) check(read[i], i, "read");
  check_no_overlap(written, read);

  std::vector<int64_t> offsets(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) offsets[t + 1] = offsets[t] + written[t].numel();
  std::vector<void*> w_ptr(w_count);
  std::vector<const void*> r_ptr(r_count);
  for (int64_t i = 0; i < w_count; ++i) w_ptr[i] = written[i].data_ptr();
  for (int64_t i = 0; i < r_count; ++i) r_ptr[i] = read[i].data_ptr();
  std::vector<void* const*> w_table(W);
  std::vector<const void* const*> r_table(R);
  for (int64_t k = 0; k < W; ++k) w_table[k] = w_ptr.data() + k * n;
  for (int64_t k = 0; k < R; ++k) r_table[k] = r_ptr.data() + k * n;
  const StreamFloorLaunch launch{{dtype, n, offsets.data()}, W, R, w_table.data(), r_table.data()};
  active_stream_floor()(launch);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amos_fused, m) {
  // The bandwidth floor of a pass (CPU): W·num_tensors tensors read and written in place,
  // R·num_tensors only read, stream-major; written[k][t] += Σ_j read[j][t] elementwise.
  m.def("stream_floor(Tensor(a!)[] written, Tensor[] read, int num_tensors) -> ()");
}

TORCH_LIBRARY_IMPL(amos_fused, CPU, m) { m.impl("stream_floor", &stream_floor_cpu); }

}  // namespace amos_fused::cpu
