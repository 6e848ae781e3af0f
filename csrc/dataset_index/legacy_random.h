// numpy.random.RandomState-compatible MT19937 and shuffle (pure C++, used by csrc/helpers.cpp).
#ifndef MEGALIGN_DATASET_INDEX_LEGACY_RANDOM_H
#define MEGALIGN_DATASET_INDEX_LEGACY_RANDOM_H

#include <algorithm>
#include <cstdint>
#include <utility>

namespace megalign {

inline void prefetch(const void* address) { __builtin_prefetch(address, 1, 1); }

// ---------------------------------------------------------------------------------------------
// numpy.random.RandomState compatible shuffling.
//
// RandomState(int seed) seeds MT19937 with init_genrand(seed), and RandomState.shuffle(x) is
// Fisher-Yates from the end: for i = n-1 .. 1 swap x[i] with x[j], j = random_interval(i).
// random_interval draws 32-bit words (or, when the bound needs more than 32 bits, 64-bit words made
// of two draws, high word first), masks them to the smallest all-ones mask covering the bound and
// rejects values above it.
// ---------------------------------------------------------------------------------------------

// MT19937 (Matsumoto & Nishimura) seeded with init_genrand; the same outputs as std::mt19937, but
// produced a block of 624 at a time in loops the compiler vectorises, and readable in bulk.
class MT19937 {
 public:
  static constexpr int kN = 624;

  explicit MT19937(uint32_t seed) {
    state_[0] = seed;
    for (int i = 1; i < kN; ++i)
      state_[i] = 1812433253U * (state_[i - 1] ^ (state_[i - 1] >> 30)) + static_cast<uint32_t>(i);
    position_ = kN;
  }

  uint32_t operator()() {
    if (position_ == kN) regenerate();
    return output_[position_++];
  }

  // The unread outputs of the current block (a new block when it is used up); consume() marks
  // how many of them were read.
  const uint32_t* block(int64_t& available) {
    if (position_ == kN) regenerate();
    available = kN - position_;
    return output_ + position_;
  }
  void consume(int64_t count) { position_ += static_cast<int>(count); }

 private:
  static constexpr int kM = 397;

  static uint32_t twist(uint32_t upper, uint32_t lower) {
    const uint32_t y = (upper & 0x80000000U) | (lower & 0x7fffffffU);
    return (y >> 1) ^ ((lower & 1U) ? 0x9908b0dfU : 0U);
  }

  void regenerate() {
    int k = 0;
    for (; k < kN - kM; ++k) state_[k] = state_[k + kM] ^ twist(state_[k], state_[k + 1]);
    for (; k < kN - 1; ++k) state_[k] = state_[k + kM - kN] ^ twist(state_[k], state_[k + 1]);
    state_[kN - 1] = state_[kM - 1] ^ twist(state_[kN - 1], state_[0]);
    for (int i = 0; i < kN; ++i) {
      uint32_t y = state_[i];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680U;
      y ^= (y << 15) & 0xefc60000U;
      y ^= y >> 18;
      output_[i] = y;
    }
    position_ = 0;
  }

  uint32_t state_[kN];
  uint32_t output_[kN];
  int position_;
};

inline uint32_t mask32(uint32_t bound) { return 0xffffffffU >> __builtin_clz(bound); }  // bound >= 1

class LegacyRandom {
 public:
  explicit LegacyRandom(uint32_t seed) : engine_(seed) {}

  uint32_t next32() { return engine_(); }

  uint64_t next64() {
    const uint64_t high = next32();
    return (high << 32) | next32();
  }

  uint64_t interval(uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    uint64_t value;
    if (max <= 0xffffffffULL) {
      do {
        value = next32() & mask;
      } while (value > max);
    } else {
      do {
        value = next64() & mask;
      } while (value > max);
    }
    return value;
  }

  // Shuffle data[0..n) exactly like RandomState.shuffle. Step s swaps position n-1-s with
  // random_interval(n-1-s). The draws depend only on the generator, so they are made a block of
  // steps ahead (without unpredictable branches) and the swap targets are prefetched.
  template <typename T>
  void shuffle(T* data, int64_t n) {
    if (n <= 1) return;
    const int64_t steps = n - 1;
    int64_t s = 0;
    for (; s < steps && static_cast<uint64_t>(n - 1 - s) > 0xffffffffULL; ++s)  // 64-bit bounds
      std::swap(data[n - 1 - s], data[interval(static_cast<uint64_t>(n - 1 - s))]);
    constexpr int64_t kBlock = 1024;
    constexpr int64_t kAhead = 16;
    uint32_t targets[kBlock];
    while (s < steps) {
      const int64_t count = std::min(kBlock, steps - s);
      draw_bounded(n - 1 - s, count, targets);
      for (int64_t k = 0; k < std::min(kAhead, count); ++k) prefetch(data + targets[k]);
      for (int64_t k = 0; k < count; ++k) {
        if (k + kAhead < count) prefetch(data + targets[k + kAhead]);
        std::swap(data[n - 1 - s - k], data[targets[k]]);
      }
      s += count;
    }
  }

 private:
  // out[k] = random_interval(first_bound - k) for k < count, with first_bound < 2**32. Within a
  // stretch where every bound has the same mask the masked words do not depend on earlier
  // acceptances, so only a cheap add-and-compare remains on the loop-carried path.
  void draw_bounded(int64_t first_bound, int64_t count, uint32_t* out) {
    int64_t made = 0;
    while (made < count) {
      int64_t available = 0;
      const uint32_t* words = engine_.block(available);
      const uint32_t high = static_cast<uint32_t>(first_bound - made);
      const uint32_t low = static_cast<uint32_t>(first_bound - (std::min(count, made + available) - 1));
      const uint32_t mask = mask32(high);
      if (mask32(low) == mask) {
        const uint64_t limit = static_cast<uint64_t>(first_bound);  // accept m when m + made <= limit
        int64_t used = 0;
        for (; used < available && made < count; ++used) {
          const uint32_t value = words[used] & mask;
          out[made] = value;
          made += static_cast<int64_t>(static_cast<uint64_t>(value) + static_cast<uint64_t>(made) <= limit);
        }
        engine_.consume(used);
      } else {
        const uint32_t value = engine_() & mask;  // one word at a time across a mask change
        out[made] = value;
        made += static_cast<int64_t>(value <= high);
      }
    }
  }

  MT19937 engine_;
};

}  // namespace megalign

#endif  // MEGALIGN_DATASET_INDEX_LEGACY_RANDOM_H
