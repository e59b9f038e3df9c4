// The per-bucket cache of device tables (see device_table.h).  Device memory comes
// from torch's CUDA caching allocator (stream-ordered frees); uploads go through
// pinned staging memory from torch's caching host allocator with non_blocking
// copies on the current stream, which keep the staging block alive until the copy
// has run.  No host synchronization.
//
// CUDA graphs: a step captured in a graph (a capturable step) reads the table as it
// was at capture, on every replay.  So under capture nothing is uploaded or
// allocated: the bucket's table must already hold exactly the step's image (an
// eager step with the same tensors before the capture, as torch's recipe warms up),
// and it is then marked captured.  A captured table is never rewritten or freed: when
// a later eager step needs other contents, or another stream, it gets a new
// table, and the captured one is kept (graph_tables) for the graphs that read it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <unordered_map>
#include <utility>

#include "device_table.h"

namespace amos_fused::cuda {
namespace {

using Section = TableImage::Section;
using ByteRange = std::pair<int64_t, int64_t>;  // [begin, end)

constexpr size_t kMaxCachedTables = 256;  // least recently used ones are dropped beyond this
constexpr int64_t kMergeGap = 64 * 1024;  // dirty ranges closer than this go up as one copy

struct KeyHash {
  size_t operator()(const TableKey& k) const {
    size_t h = std::hash<std::string>()(k.op);
    for (uint64_t x : {static_cast<uint64_t>(k.device), static_cast<uint64_t>(k.count),
                       static_cast<uint64_t>(k.first), static_cast<uint64_t>(k.last)}) {
      h ^= std::hash<uint64_t>()(x) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    }
    return h;
  }
};

struct CachedTable {
  at::Tensor device;                // uint8 on the GPU, allocated on `stream`
  std::vector<uint8_t> host;        // what `device` holds within each section's used bytes
  std::vector<Section> sections;    // the layout of `host`
  c10::StreamId stream = 0;         // the stream every upload and launch was ordered on
  uint64_t last_use = 0;
  bool captured = false;            // read by a captured CUDA graph: never rewritten or freed
};

struct Cache {
  std::mutex mutex;
  std::unordered_map<TableKey, CachedTable, KeyHash> tables;
  std::vector<at::Tensor> graph_tables;  // device tables of captured graphs, kept for their replays
  uint64_t clock = 0;
};

// Detaches a table's device memory for good when a captured graph reads it.
void retire_if_captured(Cache& c, CachedTable& table) {
  if (table.captured && table.device.defined()) c.graph_tables.push_back(table.device);
  table.captured = false;
}

// Never destroyed: device tensors must not be freed after CUDA is torn down at exit.
Cache& cache() {
  static Cache* instance = new Cache();
  return *instance;
}

bool same_layout(const std::vector<Section>& a, const std::vector<Section>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].offset != b[i].offset || a[i].capacity != b[i].capacity || a[i].item != b[i].item)
      return false;
  }
  return true;
}

// The used bytes of every section that differ from the cached copy (same layout),
// merged into few ranges.  A section whose used size changed is dirty as a whole.
std::vector<ByteRange> dirty_ranges(const TableImage& image, const CachedTable& cached) {
  std::vector<ByteRange> ranges;
  const std::vector<Section>& now = image.sections();
  for (size_t i = 0; i < now.size(); ++i) {
    const Section& s = now[i];
    if (s.used == 0) continue;
    const bool dirty = s.used != cached.sections[i].used ||
                       std::memcmp(image.bytes() + s.offset, cached.host.data() + s.offset,
                                   static_cast<size_t>(s.used)) != 0;
    if (!dirty) continue;
    if (!ranges.empty() && s.offset - ranges.back().second <= kMergeGap) {
      ranges.back().second = s.offset + s.used;
    } else {
      ranges.emplace_back(s.offset, s.offset + s.used);
    }
  }
  return ranges;
}

void upload(const at::Tensor& device, const uint8_t* source, const std::vector<ByteRange>& ranges) {
  int64_t total = 0;
  for (const ByteRange& r : ranges) total += r.second - r.first;
  at::Tensor staging =
      at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* staged = staging.data_ptr<uint8_t>();
  int64_t position = 0;
  for (const ByteRange& r : ranges) {
    std::memcpy(staged + position, source + r.first, static_cast<size_t>(r.second - r.first));
    position += r.second - r.first;
  }
  position = 0;
  for (const ByteRange& r : ranges) {
    const int64_t length = r.second - r.first;
    device.narrow(0, r.first, length)
        .copy_(staging.narrow(0, position, length), /*non_blocking=*/true);
    position += length;
  }
}

void evict_least_recently_used(Cache& c) {
  auto oldest = c.tables.begin();
  for (auto it = c.tables.begin(); it != c.tables.end(); ++it) {
    if (it->second.last_use < oldest->second.last_use) oldest = it;
  }
  retire_if_captured(c, oldest->second);
  c.tables.erase(oldest);  // the caching allocator frees it in stream order
}

}  // namespace

void with_device_table(const TableKey& key, TableImage& image,
                       const std::function<void(const uint8_t*)>& launch) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const c10::cuda::CUDAStream stream =
      c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(key.device));
  auto it = c.tables.find(key);
  if (it == c.tables.end()) {
    if (c.tables.size() >= kMaxCachedTables) evict_least_recently_used(c);
    it = c.tables.emplace(key, CachedTable{}).first;
  }
  CachedTable& table = it->second;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    // Captured: no upload, no allocation; the table must hold this image already
    // (any stream: graph capture begins after the device is synchronized).
    const bool ready = table.device.defined() && table.device.numel() >= image.total() &&
                       same_layout(image.sections(), table.sections) && dirty_ranges(image, table).empty();
    TORCH_CHECK(ready, key.op,
                ": a step captured in a CUDA graph must follow an eager step of the same optimizer with the "
                "same params, grads and states (its device tables are uploaded then; warm up before capturing, "
                "as torch's capturable optimizers do)");
    table.captured = true;
    table.last_use = ++c.clock;
    launch(table.device.data_ptr<uint8_t>());
    return;
  }
  // A table last used on another stream is replaced, not rewritten: kernels that
  // read it may still be queued there.
  const bool fresh = !table.device.defined() || table.device.numel() < image.total() ||
                     table.stream != stream.id();
  if (fresh) {
    retire_if_captured(c, table);
    table.device = at::empty({image.total()}, at::TensorOptions()
                                                  .dtype(at::kByte)
                                                  .device(at::kCUDA, stream.device_index()));
  }
  std::vector<ByteRange> ranges =
      fresh || !same_layout(image.sections(), table.sections)
          ? std::vector<ByteRange>{{0, image.total()}}
          : dirty_ranges(image, table);
  if (table.captured && !fresh && !ranges.empty()) {  // a graph reads it: write a new one
    retire_if_captured(c, table);
    table.device = at::empty({image.total()}, at::TensorOptions()
                                                  .dtype(at::kByte)
                                                  .device(at::kCUDA, stream.device_index()));
    ranges = {{0, image.total()}};
  }
  try {
    if (!ranges.empty()) upload(table.device, image.bytes(), ranges);
  } catch (...) {
    c.tables.erase(it);  // the device copy may be half written: forget it
    throw;
  }
  table.host.swap(image.storage());
  table.sections = image.sections();
  table.stream = stream.id();
  table.last_use = ++c.clock;
  launch(table.device.data_ptr<uint8_t>());
}

}  // namespace amos_fused::cuda
