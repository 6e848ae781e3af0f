// Megatron-core's blending indices (pure C++).
#ifndef MEGALIGN_DATASET_INDEX_BLENDING_H
#define MEGALIGN_DATASET_INDEX_BLENDING_H

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace megalign {

// ---------------------------------------------------------------------------------------------
// Blending: greedily give each position to the dataset furthest below its target share.
// ---------------------------------------------------------------------------------------------
inline void fill_blending_indices(const double* weights, int64_t count, int64_t size, int16_t* which, int64_t* sample) {
  std::vector<int64_t> drawn(count, 0);
  for (int64_t i = 0; i < size; ++i) {
    const double position = std::max(static_cast<double>(i), 1.0);
    int64_t best = 0;
    double best_error = weights[0] * position - static_cast<double>(drawn[0]);
    for (int64_t d = 1; d < count; ++d) {
      const double error = weights[d] * position - static_cast<double>(drawn[d]);
      if (error > best_error) {
        best_error = error;
        best = d;
      }
    }
    which[i] = static_cast<int16_t>(best);
    sample[i] = drawn[best]++;
  }
}

// Like fill_blending_indices with weights sizes / total, but a dataset leaves the race once it has
// given all its samples; ties go to the lowest dataset id.
inline void fill_exhaustive_blending_indices(const int64_t* sizes, int64_t count, int16_t* which, int64_t* sample) {
  int64_t total = 0;
  for (int64_t d = 0; d < count; ++d) total += sizes[d];
  std::vector<double> weights(count);
  std::vector<int64_t> drawn(count, 0);
  std::vector<int64_t> active;  // ascending dataset ids with samples left
  for (int64_t d = 0; d < count; ++d) {
    weights[d] = static_cast<double>(sizes[d]) / static_cast<double>(total);
    if (sizes[d] > 0) active.push_back(d);
  }
  for (int64_t i = 0; !active.empty(); ++i) {
    const double position = std::max(static_cast<double>(i), 1.0);
    size_t best_slot = 0;
    double best_error = std::numeric_limits<double>::lowest();
    for (size_t slot = 0; slot < active.size(); ++slot) {
      const int64_t d = active[slot];
      const double error = weights[d] * position - static_cast<double>(drawn[d]);
      if (error > best_error) {
        best_error = error;
        best_slot = slot;
      }
    }
    const int64_t best = active[best_slot];
    which[i] = static_cast<int16_t>(best);
    sample[i] = drawn[best]++;
    if (drawn[best] == sizes[best]) active.erase(active.begin() + static_cast<std::ptrdiff_t>(best_slot));
  }
}

}  // namespace megalign

#endif  // MEGALIGN_DATASET_INDEX_BLENDING_H
