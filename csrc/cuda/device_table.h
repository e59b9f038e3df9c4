// A bucket's metadata table: element addresses, numels, per-tensor
// coefficients and the block→(tensor, chunk) map, built on the host every call as
// a list of byte sections and mirrored in device memory.  The device copy is cached
// per bucket; a call uploads only the sections whose bytes changed (typically the
// coefficients, and the grads' addresses when autograd moved them).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace amos_fused::cuda {

// One thread block's work: tensor `tensor` of the bucket, piece `chunk` of it (a
// chunk of elements or a group of rows; the kernel says which).
struct BlockTask {
  int32_t tensor;
  uint32_t chunk;
};

// Host bytes of a table: sections of trivially copyable items, 16-byte aligned.
// Declare every section with add(), then allocate(), then fill them through data().
class TableImage {
 public:
  struct Section {
    int64_t offset;    // bytes from the start of the table
    int64_t capacity;  // bytes reserved
    int64_t used;      // bytes that hold data (compared and uploaded)
    int64_t item;      // bytes per item
  };

  template <typename T>
  int add(int64_t count) {
    static_assert(alignof(T) <= kAlign, "table items must not need more than 16-byte alignment");
    TORCH_CHECK(bytes_.empty(), "TableImage: add() after allocate()");
    const int64_t size = count * static_cast<int64_t>(sizeof(T));
    sections_.push_back({total_, size, size, static_cast<int64_t>(sizeof(T))});
    total_ += (size + kAlign - 1) / kAlign * kAlign;
    return static_cast<int>(sections_.size()) - 1;
  }

  void allocate() { bytes_.assign(static_cast<size_t>(total_), 0); }

  template <typename T>
  T* data(int section) {
    return reinterpret_cast<T*>(bytes_.data() + sections_[section].offset);
  }

  // Only the first `count` items of a section hold data (the rest of its capacity is unused).
  void set_used(int section, int64_t count) {
    Section& s = sections_[section];
    TORCH_CHECK(count * s.item <= s.capacity, "TableImage: section overflow");
    s.used = count * s.item;
  }

  int64_t total() const { return total_; }
  const std::vector<Section>& sections() const { return sections_; }
  const uint8_t* bytes() const { return bytes_.data(); }
  std::vector<uint8_t>& storage() { return bytes_; }

 private:
  static constexpr int64_t kAlign = 16;
  std::vector<Section> sections_;
  std::vector<uint8_t> bytes_;
  int64_t total_ = 0;
};

// Where a section of a table lies in device memory.
template <typename T>
const T* device_section(const uint8_t* device_base, const TableImage& image, int section) {
  return reinterpret_cast<const T*>(device_base + image.sections()[section].offset);
}

// The identity of a bucket's cached table: the op, the device and the bucket's
// params (count, first and last address).  A key that two buckets share only
// costs uploads, never correctness: the contents are always compared.
struct TableKey {
  std::string op;
  int device;
  int64_t count;
  uintptr_t first;
  uintptr_t last;

  bool operator==(const TableKey& o) const {
    return op == o.op && device == o.device && count == o.count && first == o.first &&
           last == o.last;
  }
};

// Makes `image` the content of the bucket's device table, ordered on the current
// CUDA stream: uploads the sections that differ from what the cached table holds
// (all of them when it is new, too small, laid out differently or was last used on
// another stream), then calls launch(device_base).  The cache stays locked until
// launch returns, so no other call rewrites the table before the kernels that read
// it are enqueued.  The image's bytes are taken over by the cache.
void with_device_table(const TableKey& key, TableImage& image,
                       const std::function<void(const uint8_t* device_base)>& launch);

}  // namespace amos_fused::cuda
