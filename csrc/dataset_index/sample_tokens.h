// The memory-mapped .bin and the per-token work of a GPT sample: widening, loss mask, positions
// (pure C++, used by csrc/helpers.cpp).
#ifndef MEGALIGN_DATASET_INDEX_SAMPLE_TOKENS_H
#define MEGALIGN_DATASET_INDEX_SAMPLE_TOKENS_H

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace megalign {

// A read-only memory map of a whole file (the .bin), unmapped when destroyed.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
    struct stat info;
    if (::fstat(fd, &info) != 0) {
      const int error = errno;
      ::close(fd);
      throw std::runtime_error(path + ": cannot stat: " + std::strerror(error));
    }
    size_ = static_cast<int64_t>(info.st_size);
    if (size_ > 0) {
      void* data = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_SHARED, fd, 0);
      if (data == MAP_FAILED) {
        const int error = errno;
        ::close(fd);
        throw std::runtime_error(path + ": cannot mmap: " + std::strerror(error));
      }
      data_ = static_cast<const char*>(data);
    }
    ::close(fd);
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<char*>(data_), static_cast<size_t>(size_));
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const char* data() const { return data_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const char* data_ = nullptr;
  int64_t size_ = 0;
};

inline int token_itemsize(int code) {
  switch (code) {
    case 1: case 2: return 1;   // uint8, int8
    case 3: case 8: return 2;   // int16, uint16
    case 4: return 4;           // int32
    case 5: return 8;           // int64
    default: throw std::invalid_argument("token dtype code " + std::to_string(code) + " is not an integer dtype");
  }
}

template <typename T>
void widen(const char* source, int64_t count, int64_t* out) {
  const T* tokens = reinterpret_cast<const T*>(source);
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<int64_t>(tokens[i]);
}

inline bool token_dtype_holds(int code, int64_t value) {
  switch (code) {
    case 1: return value >= 0 && value <= std::numeric_limits<uint8_t>::max();
    case 2: return value >= std::numeric_limits<int8_t>::min() && value <= std::numeric_limits<int8_t>::max();
    case 3: return value >= std::numeric_limits<int16_t>::min() && value <= std::numeric_limits<int16_t>::max();
    case 4: return value >= std::numeric_limits<int32_t>::min() && value <= std::numeric_limits<int32_t>::max();
    case 8: return value >= 0 && value <= std::numeric_limits<uint16_t>::max();
    default: return true;
  }
}

// The per-token loops below compare int64 values, which baseline x86-64 cannot vectorise; GCC and
// clang build an AVX2 clone as well and pick it at load time where the CPU has it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEGALIGN_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MEGALIGN_VECTOR_CLONES
#endif

// Loss mask: 0 where the label is padding and, with eod_mask_loss, where the input is EOD.
MEGALIGN_VECTOR_CLONES
inline void fill_loss_mask(const int64_t* __restrict tokens, const int64_t* __restrict labels,
                           float* __restrict loss, int64_t n, int64_t pad, int64_t eod, bool eod_mask_loss) {
  if (eod_mask_loss) {
    for (int64_t i = 0; i < n; ++i) loss[i] = (tokens[i] == eod) | (labels[i] == pad) ? 0.0f : 1.0f;
  } else {
    for (int64_t i = 0; i < n; ++i) loss[i] = labels[i] == pad ? 0.0f : 1.0f;
  }
}

// Position ids: 0, 1, 2, ...; with reset, counting restarts after every EOD.
MEGALIGN_VECTOR_CLONES
inline void fill_positions(const int64_t* __restrict tokens, int64_t* __restrict positions, int64_t n,
                           int64_t eod, bool reset) {
  if (!reset) {
    for (int64_t i = 0; i < n; ++i) positions[i] = i;
    return;
  }
  int64_t position = 0;
  for (int64_t i = 0; i < n; ++i) {
    positions[i] = position;
    position = tokens[i] == eod ? 0 : position + 1;
  }
}

// Segment ids: the number of EOD tokens strictly before each position.
MEGALIGN_VECTOR_CLONES
inline void fill_segments(const int64_t* __restrict tokens, int64_t* __restrict segments, int64_t n, int64_t eod) {
  int64_t current = 0;
  for (int64_t i = 0; i < n; ++i) {
    segments[i] = current;
    current += tokens[i] == eod;
  }
}

MEGALIGN_VECTOR_CLONES
inline void zero_value(int64_t* __restrict values, int64_t n, int64_t value) {
  for (int64_t i = 0; i < n; ++i) values[i] = values[i] == value ? 0 : values[i];
}

}  // namespace megalign

#endif  // MEGALIGN_DATASET_INDEX_SAMPLE_TOKENS_H
