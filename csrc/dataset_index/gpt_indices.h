// Megatron-core's GPT dataset indices: plan, document index, sample index, shuffle index (pure C++).
#ifndef MEGALIGN_DATASET_INDEX_GPT_INDICES_H
#define MEGALIGN_DATASET_INDEX_GPT_INDICES_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "legacy_random.h"

namespace megalign {

// ---------------------------------------------------------------------------------------------
// GPT index plan: everything about the indices that follows from scalars alone.
// ---------------------------------------------------------------------------------------------
struct GptPlan {
  int64_t tokens_per_epoch = 0;
  int64_t num_samples_requested = -1;  // -1: one epoch
  int64_t num_epochs = 1;
  bool separate_final_epoch = false;
  int64_t num_samples_sans_final_epoch = 0;
  int64_t num_samples = 0;         // rows of the sample index minus one
  int64_t first_shuffle_size = 0;  // the shuffle index shuffles [0, first) and [first, num_samples)
  int64_t document_index_size = 0;
  int64_t shuffle_index_size = 0;
  bool sample_index_int64 = false;   // else int32
  bool shuffle_index_int64 = false;  // else uint32
};

// Megatron's rule: an int32 sample index while positions and token offsets fit in int32.
inline bool sample_index_needs_int64(int64_t document_index_size, int64_t max_length) {
  return std::max(document_index_size, max_length) > std::numeric_limits<int32_t>::max();
}

// Samples in `tokens` tokens (the extra token already subtracted).
inline int64_t count_samples(int64_t tokens, int64_t sequence_length, bool drop_last_partial_sequence) {
  if (drop_last_partial_sequence) return tokens / sequence_length;
  // Megatron computes this ceil in single precision; keep its rounding so counts stay equal.
  return static_cast<int64_t>(std::ceil(static_cast<float>(tokens) / static_cast<float>(sequence_length)));
}

inline GptPlan plan_gpt(int64_t tokens_per_epoch, int64_t num_samples, int64_t sequence_length,
                        bool add_extra_token, bool drop_last_partial_sequence, int64_t num_documents,
                        int64_t max_length) {
  if (tokens_per_epoch <= 0) throw std::invalid_argument("plan_gpt: tokens_per_epoch must be positive");
  if (sequence_length <= 0) throw std::invalid_argument("plan_gpt: sequence_length must be positive");
  if (num_documents <= 0) throw std::invalid_argument("plan_gpt: num_documents must be positive");
  const int64_t extra = add_extra_token ? 1 : 0;
  GptPlan plan;
  plan.tokens_per_epoch = tokens_per_epoch;
  plan.num_samples_requested = num_samples;
  if (num_samples >= 0) {
    if (num_samples > (std::numeric_limits<int64_t>::max() - extra) / sequence_length)
      throw std::invalid_argument("plan_gpt: num_samples * sequence_length overflows int64");
    const int64_t requested = num_samples * sequence_length + extra;
    // The smallest number of epochs (at least one) whose tokens cover the request.
    plan.num_epochs = std::max<int64_t>(1, (requested + tokens_per_epoch - 1) / tokens_per_epoch);
  }
  if (plan.num_epochs > std::numeric_limits<int64_t>::max() / tokens_per_epoch)
    throw std::invalid_argument("plan_gpt: num_epochs * tokens_per_epoch overflows int64");
  if (plan.num_epochs > 1) {
    plan.num_samples_sans_final_epoch = ((plan.num_epochs - 1) * tokens_per_epoch - extra) / sequence_length;
    const int64_t from_final_epoch = num_samples - plan.num_samples_sans_final_epoch;
    const int64_t per_epoch = (tokens_per_epoch - extra) / sequence_length;
    // The final epoch gets its own shuffle when it contributes less than 80% of an epoch.
    plan.separate_final_epoch = from_final_epoch < static_cast<int64_t>(0.80 * static_cast<double>(per_epoch));
  }
  plan.num_samples = count_samples(plan.num_epochs * tokens_per_epoch - extra, sequence_length,
                                   drop_last_partial_sequence);
  plan.first_shuffle_size = plan.separate_final_epoch ? plan.num_samples_sans_final_epoch : plan.num_samples;
  plan.shuffle_index_size = plan.first_shuffle_size == plan.num_samples
                                ? plan.num_samples
                                : std::max(plan.first_shuffle_size, plan.num_samples);
  if (plan.num_epochs > std::numeric_limits<int64_t>::max() / num_documents)
    throw std::invalid_argument("plan_gpt: num_epochs * num_documents overflows int64");
  plan.document_index_size = plan.num_epochs * num_documents;
  // Megatron's dtype rules; the shuffle index is uint32 below 2**32 - 2 samples.
  plan.sample_index_int64 = sample_index_needs_int64(plan.document_index_size, max_length);
  plan.shuffle_index_int64 = plan.num_samples >= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()) - 1;
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Sample index: row k = (position in the document index, token offset) where sample k starts;
// samples are sequence_length (+1 with the extra token) tokens and run across document boundaries.
// ---------------------------------------------------------------------------------------------
// lengths[document_index[position]] for increasing positions, gathered a chunk at a time: the
// independent random reads of a gather loop overlap far better than reads inside the sample walk.
class GatheredLengths {
 public:
  GatheredLengths(const int32_t* lengths, const int32_t* document_index, int64_t size)
      : lengths_(lengths), documents_(document_index), size_(size), buffer_(kChunk) {}

  int64_t at(int64_t position) {
    if (position >= end_) refill(position);
    return buffer_[static_cast<size_t>(position - begin_)];
  }

 private:
  static constexpr int64_t kChunk = 8192;

  void refill(int64_t position) {
    begin_ = position;
    end_ = std::min(size_, position + kChunk);
    for (int64_t k = begin_; k < end_; ++k) buffer_[static_cast<size_t>(k - begin_)] = lengths_[documents_[k]];
  }

  const int32_t* lengths_;
  const int32_t* documents_;
  int64_t size_;
  int64_t begin_ = 0;
  int64_t end_ = 0;
  std::vector<int32_t> buffer_;
};

// Megatron walks the documents sample by sample; equivalently, sample k (k >= 1) starts where the
// token g = k * sequence_length + extra - 1 of the flattened document sequence lies: at the document
// containing g, at offset (g - document start) + 1 - extra. A walk past the last document pins the
// start to (last document, its length - extra), as Megatron's loop does.
template <typename T>
void fill_sample_index(const int32_t* lengths, const int32_t* document_index, int64_t document_index_size,
                       int64_t sequence_length, int64_t num_samples, int64_t extra, T* out) {
  GatheredLengths length_at(lengths, document_index, document_index_size);
  int64_t position = 0;
  int64_t start = 0;                  // first token of document `position`
  int64_t end = length_at.at(0);      // one past its last token
  const int64_t last = document_index_size - 1;
  out[0] = 0;
  out[1] = 0;
  for (int64_t row = 1; row <= num_samples; ++row) {
    const int64_t g = row * sequence_length + extra - 1;
    while (end <= g && position < last) {
      ++position;
      start = end;
      end += length_at.at(position);
    }
    const int64_t offset = g < end ? g - start + 1 - extra : (end - start) - extra;
    out[2 * row] = static_cast<T>(position);
    out[2 * row + 1] = static_cast<T>(offset);
  }
}

template <typename T>
void fill_and_shuffle_range(T* out, int64_t begin, int64_t end, LegacyRandom& random) {
  for (int64_t i = begin; i < end; ++i) out[i - begin] = static_cast<T>(i);
  random.shuffle(out, end - begin);
}

// Document index: epochs x documents [begin, end), shuffled as one block, or -- when the final
// epoch is separate -- the first epochs as one block and the final epoch as a second block.
inline void fill_document_index(int32_t* out, int64_t begin, int64_t end, const GptPlan& plan, LegacyRandom& random) {
  const int64_t count = end - begin;
  for (int64_t epoch = 0; epoch < plan.num_epochs; ++epoch) {
    int32_t* row = out + epoch * count;
    for (int64_t i = 0; i < count; ++i) row[i] = static_cast<int32_t>(begin + i);
  }
  if (!plan.separate_final_epoch || plan.num_epochs == 1) {
    random.shuffle(out, plan.num_epochs * count);
  } else {
    random.shuffle(out, (plan.num_epochs - 1) * count);
    random.shuffle(out + (plan.num_epochs - 1) * count, count);
  }
}

template <typename T>
void fill_shuffle_index(T* out, const GptPlan& plan, LegacyRandom& random) {
  const int64_t first = plan.first_shuffle_size;
  fill_and_shuffle_range(out, 0, first, random);
  if (first != plan.num_samples) fill_and_shuffle_range(out + first, first, plan.num_samples, random);
}

}  // namespace megalign

#endif  // MEGALIGN_DATASET_INDEX_GPT_INDICES_H
