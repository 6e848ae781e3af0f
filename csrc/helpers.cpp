// megalign dataset-index helpers (pybind11 module `megalign._helpers`).
//
// Reproduces megatron-core 0.16.1's GPT / blended dataset indices bit for bit. The algorithms are
// plain C++ in csrc/dataset_index/ (legacy_random.h: numpy's RandomState shuffle; gpt_indices.h:
// plan, document / sample / shuffle index; blending.h; sample_tokens.h: per-token sample work);
// this file binds them to numpy arrays:
//   * build_gpt_indices  all three GPT indices in one call, the GIL released
//   * SampleReader       one GPT sample (tokens, labels, loss mask, position ids) per call, read
//                        straight from the memory-mapped .bin into the output arrays
//   * ByteLevelBPE       byte-level BPE with piece and word caches (csrc/bpe/), driven by
//                        megalign/data/fast_bpe.py, which keeps the regex pre-tokenization
// The Python wrappers in megalign/data/index_helpers.py validate arguments; this file trusts dtypes
// and shapes but bounds-checks every value it reads from index arrays, so a corrupt cache raises
// instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <thread>
#include <utility>
#include <vector>

#include "bpe/byte_level_bpe.h"
#include "dataset_index/blending.h"
#include "dataset_index/gpt_indices.h"
#include "dataset_index/legacy_random.h"
#include "dataset_index/sample_tokens.h"

namespace py = pybind11;

namespace {

using namespace megalign;  // NOLINT(build/namespaces): the algorithms this module binds

py::dict plan_to_dict(const GptPlan& plan) {
  py::dict out;
  out["tokens_per_epoch"] = plan.tokens_per_epoch;
  out["num_samples_requested"] = plan.num_samples_requested;
  out["num_epochs"] = plan.num_epochs;
  out["separate_final_epoch"] = plan.separate_final_epoch;
  out["num_samples_sans_final_epoch"] = plan.num_samples_sans_final_epoch;
  out["num_samples"] = plan.num_samples;
  out["first_shuffle_size"] = plan.first_shuffle_size;
  out["document_index_size"] = plan.document_index_size;
  out["shuffle_index_size"] = plan.shuffle_index_size;
  out["sample_index_int64"] = plan.sample_index_int64;
  out["shuffle_index_int64"] = plan.shuffle_index_int64;
  return out;
}

const int32_t* int32_data(const py::array& array, const char* name) {
  if (!py::isinstance<py::array_t<int32_t>>(array) || array.ndim() != 1 ||
      !(array.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + " must be a contiguous 1-D int32 array");
  return static_cast<const int32_t*>(array.data());
}

std::pair<int64_t, int64_t> checked_range(const py::array& lengths, int64_t begin, int64_t end) {
  if (begin < 0 || end < begin || end > lengths.shape(0))
    throw std::invalid_argument("document range [" + std::to_string(begin) + ", " + std::to_string(end) +
                                ") is outside the " + std::to_string(lengths.shape(0)) + " sequences");
  return {begin, end};
}

// tokens in [begin, end), the longest sequence overall and a 64-bit fingerprint of the range.
py::dict summarize_lengths(const py::array& lengths_array, int64_t begin, int64_t end) {
  const int32_t* lengths = int32_data(lengths_array, "sequence_lengths");
  checked_range(lengths_array, begin, end);
  const int64_t size = lengths_array.shape(0);
  int64_t tokens = 0;
  int64_t longest = 0;
  int64_t negative = -1;
  uint64_t hash = 0x243f6a8885a308d3ULL ^ static_cast<uint64_t>(end - begin);
  {
    py::gil_scoped_release release;
    int32_t longest32 = 0, shortest = 0;
    for (int64_t i = 0; i < size; ++i) {
      longest32 = std::max(longest32, lengths[i]);
      shortest = std::min(shortest, lengths[i]);
    }
    longest = longest32;
    if (shortest < 0) {
      for (int64_t i = 0; i < size && negative < 0; ++i)
        if (lengths[i] < 0) negative = i;
    } else {
      // Four independent multiply-xorshift lanes (for instruction-level parallelism), then mixed.
      constexpr uint64_t kPrime = 0x9e3779b97f4a7c15ULL;
      uint64_t lane[4] = {hash, hash ^ 1, hash ^ 2, hash ^ 3};
      int64_t i = begin;
      for (; i + 4 <= end; i += 4) {
        for (int k = 0; k < 4; ++k) {
          const int32_t value = lengths[i + k];
          tokens += value;
          lane[k] = (lane[k] ^ static_cast<uint32_t>(value)) * kPrime;
          lane[k] ^= lane[k] >> 31;
        }
      }
      for (; i < end; ++i) {
        tokens += lengths[i];
        lane[0] = (lane[0] ^ static_cast<uint32_t>(lengths[i])) * kPrime;
        lane[0] ^= lane[0] >> 31;
      }
      for (int k = 0; k < 4; ++k) hash = (hash ^ lane[k]) * kPrime, hash ^= hash >> 29;
    }
  }
  if (negative >= 0) throw std::invalid_argument("sequence " + std::to_string(negative) + " has a negative length");
  py::dict out;
  out["tokens"] = tokens;
  out["max_length"] = longest;
  out["fingerprint"] = hash;
  return out;
}

py::dict build_gpt(const py::array& lengths_array, int64_t begin, int64_t end, int64_t num_samples,
                   int64_t sequence_length, bool add_extra_token, bool drop_last_partial_sequence, uint32_t seed,
                   int64_t tokens_per_epoch, int64_t max_length) {
  const int32_t* lengths = int32_data(lengths_array, "sequence_lengths");
  checked_range(lengths_array, begin, end);
  if (begin == end) throw std::invalid_argument("build_gpt: the document range is empty");
  const GptPlan plan = plan_gpt(tokens_per_epoch, num_samples, sequence_length, add_extra_token,
                                drop_last_partial_sequence, end - begin, max_length);
  const int64_t document_count = plan.document_index_size;
  const bool sample_int32 = !plan.sample_index_int64;
  const int64_t shuffle_size = plan.shuffle_index_size;
  const bool shuffle_uint32 = !plan.shuffle_index_int64;

  py::array_t<int32_t> document_index(document_count);
  py::array sample_index = sample_int32 ? py::array(py::array_t<int32_t>({plan.num_samples + 1, int64_t{2}}))
                                        : py::array(py::array_t<int64_t>({plan.num_samples + 1, int64_t{2}}));
  py::array shuffle_index = shuffle_uint32 ? py::array(py::array_t<uint32_t>(shuffle_size))
                                           : py::array(py::array_t<int64_t>(shuffle_size));
  int32_t* documents = document_index.mutable_data();
  void* samples = sample_index.mutable_data();
  void* shuffle = shuffle_index.mutable_data();
  {
    py::gil_scoped_release release;
    LegacyRandom random(seed);
    fill_document_index(documents, begin, end, plan, random);
    // The shuffle index only needs the generator state from here on, so it is built on a second
    // thread while this one walks the documents for the sample index.
    auto shuffle_job = [&plan, shuffle, shuffle_uint32, random]() mutable {
      if (shuffle_uint32)
        fill_shuffle_index(static_cast<uint32_t*>(shuffle), plan, random);
      else
        fill_shuffle_index(static_cast<int64_t*>(shuffle), plan, random);
    };
    const int64_t extra = add_extra_token ? 1 : 0;
    auto sample_job = [&]() {
      if (sample_int32)
        fill_sample_index(lengths, documents, document_count, sequence_length, plan.num_samples, extra,
                          static_cast<int32_t*>(samples));
      else
        fill_sample_index(lengths, documents, document_count, sequence_length, plan.num_samples, extra,
                          static_cast<int64_t*>(samples));
    };
    if (plan.num_samples >= (1 << 16) && std::thread::hardware_concurrency() > 1) {
      std::thread worker(shuffle_job);
      sample_job();
      worker.join();
    } else {
      sample_job();
      shuffle_job();
    }
  }
  py::dict out = plan_to_dict(plan);
  out["document_index"] = document_index;
  out["sample_index"] = sample_index;
  out["shuffle_index"] = shuffle_index;
  return out;
}

template <typename T>
py::array new_sample_index(const int32_t* lengths, const int32_t* documents, int64_t document_count,
                           int64_t sequence_length, int64_t num_samples, int64_t extra) {
  py::array_t<T> out({num_samples + 1, int64_t{2}});
  T* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    fill_sample_index(lengths, documents, document_count, sequence_length, num_samples, extra, data);
  }
  return std::move(out);
}

py::array build_sample_index(const py::array& lengths_array, const py::array& document_index_array,
                             int64_t sequence_length, int64_t num_epochs, int64_t tokens_per_epoch,
                             bool drop_last_partial_sequence, bool add_extra_token) {
  const int32_t* lengths = int32_data(lengths_array, "sequence_lengths");
  const int32_t* documents = int32_data(document_index_array, "document_index");
  const int64_t document_count = document_index_array.shape(0);
  if (document_count == 0) throw std::invalid_argument("build_sample_index: the document index is empty");
  if (tokens_per_epoch <= 0 || num_epochs <= 0)
    throw std::invalid_argument("build_sample_index: num_epochs and tokens_per_epoch must be positive");
  const int64_t nsequences = lengths_array.shape(0);
  int64_t longest = 0;
  for (int64_t i = 0; i < document_count; ++i) {
    if (documents[i] < 0 || documents[i] >= nsequences)
      throw std::invalid_argument("document index entry " + std::to_string(i) + " is not a sequence id");
  }
  for (int64_t i = 0; i < nsequences; ++i) longest = std::max<int64_t>(longest, lengths[i]);
  const int64_t extra = add_extra_token ? 1 : 0;
  const int64_t num_samples = count_samples(num_epochs * tokens_per_epoch - extra, sequence_length,
                                            drop_last_partial_sequence);
  if (sample_index_needs_int64(document_count, longest))
    return new_sample_index<int64_t>(lengths, documents, document_count, sequence_length, num_samples, extra);
  return new_sample_index<int32_t>(lengths, documents, document_count, sequence_length, num_samples, extra);
}

void check_dataset_count(int64_t count, const char* where) {
  if (count <= 0 || count > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument(std::string(where) + ": need 1 to 32767 datasets");
}

py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                 int64_t size) {
  check_dataset_count(weights.shape(0), "build_blending_indices");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be non-negative");
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* which = dataset_index.mutable_data();
  int64_t* sample = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    fill_blending_indices(weights.data(), weights.shape(0), size, which, sample);
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

py::tuple build_exhaustive_blending_indices(py::array_t<int64_t, py::array::c_style | py::array::forcecast> sizes) {
  check_dataset_count(sizes.shape(0), "build_exhaustive_blending_indices");
  int64_t total = 0;
  for (int64_t d = 0; d < sizes.shape(0); ++d) {
    if (sizes.data()[d] < 0) throw std::invalid_argument("build_exhaustive_blending_indices: negative size");
    total += sizes.data()[d];
  }
  py::array_t<int16_t> dataset_index(total);
  py::array_t<int64_t> dataset_sample_index(total);
  int16_t* which = dataset_index.mutable_data();
  int64_t* sample = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    fill_exhaustive_blending_indices(sizes.data(), sizes.shape(0), which, sample);
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

// ---------------------------------------------------------------------------------------------
// Sample reader.
// ---------------------------------------------------------------------------------------------

// A read-only 1-D integer array of one of the index dtypes, read as int64.
class IntView {
 public:
  IntView() = default;
  IntView(py::array array, const char* name) : array_(std::move(array)) {
    if (!(array_.flags() & py::array::c_style))
      throw std::invalid_argument(std::string(name) + " must be C-contiguous");
    const char kind = array_.dtype().kind();
    itemsize_ = array_.itemsize();
    if (!((kind == 'i' && (itemsize_ == 4 || itemsize_ == 8)) || (kind == 'u' && itemsize_ == 4)))
      throw std::invalid_argument(std::string(name) + " must be int32, uint32 or int64");
    unsigned_ = kind == 'u';
    data_ = static_cast<const char*>(array_.data());
    size_ = array_.size();
  }
  int64_t size() const { return size_; }
  int64_t operator[](int64_t i) const {
    if (itemsize_ == 8) return reinterpret_cast<const int64_t*>(data_)[i];
    if (unsigned_) return reinterpret_cast<const uint32_t*>(data_)[i];
    return reinterpret_cast<const int32_t*>(data_)[i];
  }

 private:
  py::array array_;
  const char* data_ = nullptr;
  int64_t size_ = 0;
  int64_t itemsize_ = 4;
  bool unsigned_ = false;
};

struct ReaderOptions {
  int64_t sequence_length = 0;
  bool add_extra_token = true;
  int64_t pad_token = -1;
  int64_t eod_token = 0;
  bool reset_position_ids = false;
  bool eod_mask_loss = false;
  bool segment_ids = false;
};

class SampleReader {
 public:
  SampleReader(const std::string& bin_path, int dtype_code, py::array sequence_pointers,
               py::array sequence_lengths, py::array document_index, py::array sample_index,
               py::object shuffle_index, int64_t sequence_length, bool add_extra_token, int64_t pad_token,
               int64_t eod_token, bool reset_position_ids, bool eod_mask_loss, bool segment_ids)
      : file_(bin_path),
        itemsize_(token_itemsize(dtype_code)),
        dtype_code_(dtype_code),
        pointers_(std::move(sequence_pointers), "sequence_pointers"),
        lengths_(std::move(sequence_lengths), "sequence_lengths"),
        documents_(std::move(document_index), "document_index"),
        samples_(std::move(sample_index), "sample_index") {
    if (sequence_length <= 0) throw std::invalid_argument("sequence_length must be positive");
    if (pointers_.size() != lengths_.size())
      throw std::invalid_argument("sequence_pointers and sequence_lengths differ in length");
    if (samples_.size() < 2 || samples_.size() % 2 != 0)
      throw std::invalid_argument("sample_index must have shape (num_samples + 1, 2)");
    options_.sequence_length = sequence_length;
    options_.add_extra_token = add_extra_token;
    options_.pad_token = pad_token;
    options_.eod_token = eod_token;
    options_.reset_position_ids = reset_position_ids;
    options_.eod_mask_loss = eod_mask_loss;
    options_.segment_ids = segment_ids;
    has_shuffle_ = !shuffle_index.is_none();
    if (has_shuffle_) shuffle_ = IntView(shuffle_index.cast<py::array>(), "shuffle_index");
    size_ = has_shuffle_ ? shuffle_.size() : samples_.size() / 2 - 1;
    text_.resize(static_cast<size_t>(sequence_length + (add_extra_token ? 1 : 0)));
    pad_in_data_ = token_dtype_holds(dtype_code, pad_token);
  }

  int64_t size() const { return size_; }

  py::tuple read(int64_t idx) {
    if (idx < 0) idx += size_;
    if (idx < 0 || idx >= size_) throw py::index_error("sample index out of range");
    const int64_t sample = has_shuffle_ ? shuffle_[idx] : idx;
    const int64_t rows = samples_.size() / 2;
    if (sample < 0 || sample + 1 >= rows)
      corrupt("shuffle index entry " + std::to_string(idx) + " = " + std::to_string(sample) + " is not a sample");
    gather(samples_[2 * sample], samples_[2 * sample + 1], samples_[2 * sample + 2], samples_[2 * sample + 3]);
    return finish();
  }

 private:
  [[noreturn]] void corrupt(const std::string& problem) const {
    throw std::invalid_argument(problem + " (reading " + file_.path() + ")");
  }

  void copy_span(int64_t position, int64_t offset, int64_t length, bool to_end, int64_t& filled) {
    if (position < 0 || position >= documents_.size())
      corrupt("sample index points at document-index position " + std::to_string(position));
    const int64_t sequence = documents_[position];
    if (sequence < 0 || sequence >= lengths_.size())
      corrupt("document index holds sequence id " + std::to_string(sequence));
    if (to_end) length = lengths_[sequence] - offset;
    const int64_t capacity = static_cast<int64_t>(text_.size());
    const int64_t start = pointers_[sequence] + offset * itemsize_;
    if (offset < 0 || length < 0 || filled + length > capacity || start < 0 ||
        start + length * itemsize_ > file_.size())
      corrupt("span of sequence " + std::to_string(sequence) + " (offset " + std::to_string(offset) +
              ", length " + std::to_string(length) + ") does not fit the sample or the data file");
    const char* source = file_.data() + start;
    int64_t* out = text_.data() + filled;
    switch (dtype_code_) {
      case 1: widen<uint8_t>(source, length, out); break;
      case 2: widen<int8_t>(source, length, out); break;
      case 3: widen<int16_t>(source, length, out); break;
      case 4: widen<int32_t>(source, length, out); break;
      case 5: widen<int64_t>(source, length, out); break;
      default: widen<uint16_t>(source, length, out); break;
    }
    filled += length;
  }

  void gather(int64_t first, int64_t first_offset, int64_t last, int64_t last_offset) {
    const int64_t extra = options_.add_extra_token ? 1 : 0;
    int64_t filled = 0;
    if (first == last) {
      copy_span(first, first_offset, last_offset - first_offset + extra, false, filled);
    } else {
      if (last < first) corrupt("sample index rows go backwards");
      for (int64_t position = first; position <= last; ++position) {
        const int64_t offset = position == first ? first_offset : 0;
        if (position < last)
          copy_span(position, offset, 0, true, filled);
        else
          copy_span(position, offset, last_offset + extra, false, filled);
      }
    }
    std::fill(text_.begin() + filled, text_.end(), options_.pad_token);
    filled_ = filled;
  }

  py::tuple finish() {
    const int64_t n = options_.sequence_length;
    const int64_t pad = options_.pad_token;
    const int64_t eod = options_.eod_token;
    py::array_t<int64_t> tokens_array(n), labels_array(n), positions_array(n);
    py::array_t<float> loss_array(n);
    int64_t* tokens = tokens_array.mutable_data();
    int64_t* labels = labels_array.mutable_data();
    const int64_t* text = text_.data();
    std::memcpy(tokens, text, static_cast<size_t>(n) * sizeof(int64_t));
    if (options_.add_extra_token) {
      std::memcpy(labels, text + 1, static_cast<size_t>(n) * sizeof(int64_t));
    } else {
      std::memcpy(labels, text + 1, static_cast<size_t>(n - 1) * sizeof(int64_t));
      labels[n - 1] = pad;
    }
    fill_loss_mask(tokens, labels, loss_array.mutable_data(), n, pad, eod, options_.eod_mask_loss);
    fill_positions(tokens, positions_array.mutable_data(), n, eod, options_.reset_position_ids);
    py::object segments = py::none();
    if (options_.segment_ids) {
      py::array_t<int64_t> segment_array(n);
      fill_segments(tokens, segment_array.mutable_data(), n, eod);
      segments = std::move(segment_array);
    }
    // Pad ids become 0 so the embedding can look them up; when the pad id cannot occur in the
    // data, only the padded tail needs the scan.
    const int64_t first = pad_in_data_ ? 0 : std::max<int64_t>(0, filled_ - 1);
    zero_value(tokens + first, n - first, pad);
    zero_value(labels + first, n - first, pad);
    return py::make_tuple(tokens_array, labels_array, loss_array, positions_array, segments);
  }

  MappedFile file_;
  int64_t itemsize_;
  int dtype_code_;
  IntView pointers_, lengths_, documents_, samples_, shuffle_;
  bool has_shuffle_ = false;
  int64_t size_ = 0;
  ReaderOptions options_;
  std::vector<int64_t> text_;
  int64_t filled_ = 0;         // tokens of text_ read from the data (the rest is padding)
  bool pad_in_data_ = true;    // whether the pad id is a value the token dtype can hold
};

// UTF-8 bytes of a Python str, owned by the str (valid while it lives).
std::string_view utf8_view(py::handle text) {
  if (!PyUnicode_Check(text.ptr())) throw py::type_error("ByteLevelBPE: expected str");
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();
  return {data, static_cast<size_t>(size)};
}

// megalign::bpe::SpaceCutEncoder for Python: str in, lists of int out; the regex split is a callback.
class ByteLevelBPEBinding {
 public:
  // vocab and merges as in tokenizer.json's BPE model (merges "a b" strings or [a, b] pairs);
  // alphabet[b]: the byte-level character of byte b.
  ByteLevelBPEBinding(const py::dict& vocab, const py::list& merges, bool ignore_merges,
                      const std::vector<uint32_t>& alphabet, const std::vector<uint32_t>& whitespace,
                      size_t cache_limit)
      : encoder_(make_model(vocab, merges, ignore_merges, alphabet), whitespace, cache_limit) {
    int64_t largest = 0;
    for (const auto& item : vocab) largest = std::max(largest, item.second.cast<int64_t>());
    ints_.reserve(static_cast<size_t>(largest) + 1);
    for (int64_t id = 0; id <= largest; ++id) ints_.push_back(py::int_(id));
  }

  // The ids of each piece (a list of tuples); pieces are cached.
  py::list encode_pieces(const py::list& pieces) {
    std::vector<std::string_view> views;
    views.reserve(pieces.size());
    for (py::handle piece : pieces) views.push_back(utf8_view(piece));
    std::vector<int32_t> ids;
    std::vector<size_t> ends;
    encoder_.encode_pieces(views, ids, &ends);
    py::list out(views.size());
    size_t begin = 0;
    for (size_t i = 0; i < ends.size(); ++i) {
      out[i] = to_python<py::tuple>(ids.data() + begin, ends[i] - begin);
      begin = ends[i];
    }
    return out;
  }

  // The ids of each segment (a list of lists); split(list of str) must return each string's pieces.
  py::list encode_segments(const py::list& segments, const py::function& split) {
    std::vector<std::string_view> views;
    views.reserve(segments.size());
    for (py::handle segment : segments) views.push_back(utf8_view(segment));
    megalign::bpe::SpaceCutEncoder::Batch batch;
    {
      py::gil_scoped_release release;
      batch = encoder_.plan(views);
    }
    py::list texts(batch.texts().size());
    for (size_t i = 0; i < batch.texts().size(); ++i) {
      const std::string& text = batch.texts()[i];
      PyObject* decoded = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "strict");
      if (decoded == nullptr) throw py::error_already_set();
      texts[i] = py::reinterpret_steal<py::str>(decoded);
    }
    const py::list split_texts = split(texts);
    if (split_texts.size() != batch.texts().size()) throw std::invalid_argument("split returned the wrong count");
    std::vector<std::vector<std::string_view>> pieces(split_texts.size());
    for (size_t i = 0; i < pieces.size(); ++i)
      for (py::handle piece : split_texts[i].cast<py::list>()) pieces[i].push_back(utf8_view(piece));
    std::vector<int32_t> ids;
    std::vector<size_t> offsets;
    {
      py::gil_scoped_release release;
      encoder_.finish(batch, pieces, ids, offsets);
    }
    py::list out(views.size());
    for (size_t i = 0; i < views.size(); ++i)
      out[i] = to_python<py::list>(ids.data() + offsets[i], offsets[i + 1] - offsets[i]);
    return out;
  }

  size_t cached_words() const { return encoder_.cached_words(); }
  size_t cached_pieces() const { return encoder_.cached_pieces(); }
  bool has_word(const std::string& word) const { return encoder_.has_word(word); }

 private:
  static megalign::bpe::BytePairModel make_model(const py::dict& vocab, const py::list& merges, bool ignore_merges,
                                                 const std::vector<uint32_t>& alphabet) {
    if (alphabet.size() != 256) throw std::invalid_argument("ByteLevelBPE: the alphabet needs 256 characters");
    std::unordered_map<uint32_t, char> to_byte;
    for (size_t byte = 0; byte < 256; ++byte) to_byte[alphabet[byte]] = static_cast<char>(byte);
    // A token's bytes; false for characters outside the alphabet (such a token never matches a piece).
    const auto to_bytes = [&](py::handle token, std::string& out) {
      const std::string_view text = utf8_view(token);
      out.clear();
      for (size_t at = 0; at < text.size();) {
        const size_t length = megalign::bpe::utf8_length(static_cast<unsigned char>(text[at]));
        const auto it = to_byte.find(megalign::bpe::decode_utf8(text, at));
        if (it == to_byte.end()) return false;
        out.push_back(it->second);
        at += length;
      }
      return true;
    };
    std::vector<std::pair<std::string, int32_t>> tokens;
    tokens.reserve(vocab.size());
    std::string bytes;
    for (const auto& item : vocab) {
      const int64_t id = item.second.cast<int64_t>();
      if (id < 0 || id > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("ByteLevelBPE: bad token id");
      if (to_bytes(item.first, bytes)) tokens.emplace_back(bytes, static_cast<int32_t>(id));
    }
    std::vector<megalign::bpe::BytePairModel::Merge> converted;
    converted.reserve(merges.size());
    std::string left, right;
    uint32_t rank = 0;
    for (py::handle merge : merges) {
      bool usable;
      if (PyUnicode_Check(merge.ptr())) {
        const std::string_view text = utf8_view(merge);
        const size_t space = text.find(' ');
        if (space == std::string_view::npos || text.find(' ', space + 1) != std::string_view::npos)
          throw std::invalid_argument("ByteLevelBPE: a merge is not two tokens separated by one space");
        const py::str first(text.data(), space), second(text.data() + space + 1, text.size() - space - 1);
        usable = to_bytes(first, left) && to_bytes(second, right);
      } else {
        const py::sequence pair = py::reinterpret_borrow<py::sequence>(merge);
        if (pair.size() != 2) throw std::invalid_argument("ByteLevelBPE: a merge is not a pair of tokens");
        usable = to_bytes(pair[0], left) && to_bytes(pair[1], right);
      }
      if (usable) converted.push_back({left, right, rank});
      ++rank;
    }
    return megalign::bpe::BytePairModel(tokens, converted, ignore_merges);
  }

  // A list or tuple of Python ints, shared from ints_ (ids are vocabulary ids, so in range).
  template <typename Sequence>
  Sequence to_python(const int32_t* ids, size_t count) const {
    Sequence out(count);
    PyObject* raw = out.ptr();
    for (size_t k = 0; k < count; ++k) {
      PyObject* item = ints_.at(static_cast<size_t>(ids[k])).ptr();
      Py_INCREF(item);
      if constexpr (std::is_same_v<Sequence, py::list>)
        PyList_SET_ITEM(raw, static_cast<Py_ssize_t>(k), item);
      else
        PyTuple_SET_ITEM(raw, static_cast<Py_ssize_t>(k), item);
    }
    return out;
  }

  megalign::bpe::SpaceCutEncoder encoder_;
  std::vector<py::int_> ints_;
};

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "megalign dataset index helpers (megatron-core compatible GPT and blended indices)";

  py::class_<LegacyRandom>(m, "LegacyRandomState",
                           "numpy.random.RandomState(seed)-compatible MT19937: shuffle() gives identical results")
      .def(py::init<uint32_t>(), py::arg("seed"))
      .def("random_interval", &LegacyRandom::interval, py::arg("max"),
           "A uniform integer in [0, max], drawn like numpy's legacy random_interval")
      .def(
          "shuffle",
          [](LegacyRandom& self, py::array array) {
            if (array.ndim() != 1 || !(array.flags() & py::array::c_style) || !array.writeable())
              throw std::invalid_argument("shuffle needs a writeable contiguous 1-D array");
            void* data = array.mutable_data();
            const int64_t n = array.shape(0);
            switch (array.itemsize()) {
              case 1: self.shuffle(static_cast<uint8_t*>(data), n); break;
              case 2: self.shuffle(static_cast<uint16_t*>(data), n); break;
              case 4: self.shuffle(static_cast<uint32_t*>(data), n); break;
              case 8: self.shuffle(static_cast<uint64_t*>(data), n); break;
              default: throw std::invalid_argument("shuffle supports 1, 2, 4 and 8-byte items");
            }
          },
          py::arg("array"), "Shuffle a 1-D array in place like numpy.random.RandomState.shuffle");

  m.def(
      "plan_gpt",
      [](int64_t tokens_per_epoch, int64_t num_samples, int64_t sequence_length, bool add_extra_token,
         bool drop_last_partial_sequence, int64_t num_documents, int64_t max_length) {
        return plan_to_dict(plan_gpt(tokens_per_epoch, num_samples, sequence_length, add_extra_token,
                                     drop_last_partial_sequence, num_documents, max_length));
      },
      py::arg("tokens_per_epoch"), py::arg("num_samples"), py::arg("sequence_length"), py::arg("add_extra_token"),
      py::arg("drop_last_partial_sequence"), py::arg("num_documents"), py::arg("max_length"),
      "Epochs, sample counts, shuffle ranges, array sizes and dtypes of a GPT dataset's indices");
  m.def("summarize_lengths", &summarize_lengths, py::arg("sequence_lengths"), py::arg("begin"), py::arg("end"),
        "Tokens in [begin, end), the longest sequence overall and a fingerprint of the range");
  m.def("build_gpt_indices", &build_gpt, py::arg("sequence_lengths"), py::arg("begin"), py::arg("end"),
        py::arg("num_samples"), py::arg("sequence_length"), py::arg("add_extra_token"),
        py::arg("drop_last_partial_sequence"), py::arg("seed"), py::arg("tokens_per_epoch"), py::arg("max_length"),
        "Document, sample and shuffle index of a GPT dataset over sequences [begin, end)");
  m.def("build_sample_index", &build_sample_index, py::arg("sequence_lengths"), py::arg("document_index"),
        py::arg("sequence_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        py::arg("drop_last_partial_sequence"), py::arg("add_extra_token"),
        "The (num_samples + 1, 2) sample index over a given document index");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Dataset index (int16) and dataset sample index (int64) for normalised weights");
  m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices, py::arg("sizes"),
        "Blending indices that draw exactly sizes[i] samples from dataset i");

  py::class_<SampleReader>(m, "SampleReader", "Reads GPT samples from a .bin through the three indices")
      .def(py::init<const std::string&, int, py::array, py::array, py::array, py::array, py::object, int64_t, bool,
                    int64_t, int64_t, bool, bool, bool>(),
           py::arg("bin_path"), py::arg("dtype_code"), py::arg("sequence_pointers"), py::arg("sequence_lengths"),
           py::arg("document_index"), py::arg("sample_index"), py::arg("shuffle_index"), py::arg("sequence_length"),
           py::arg("add_extra_token"), py::arg("pad_token"), py::arg("eod_token"), py::arg("reset_position_ids"),
           py::arg("eod_mask_loss"), py::arg("segment_ids"))
      .def("__len__", &SampleReader::size)
      .def("read", &SampleReader::read, py::arg("idx"),
           "(tokens, labels, loss_mask, position_ids, segment_ids or None) of sample idx");

  py::class_<ByteLevelBPEBinding>(m, "ByteLevelBPE",
                                  "Byte-level BPE (tokenizers' merge order) with piece and space-cut word caches")
      .def(py::init<const py::dict&, const py::list&, bool, const std::vector<uint32_t>&, const std::vector<uint32_t>&,
                    size_t>(),
           py::arg("vocab"), py::arg("merges"), py::arg("ignore_merges"), py::arg("alphabet"), py::arg("whitespace"),
           py::arg("cache_limit"),
           "vocab and merges of a tokenizer.json BPE model; alphabet: the byte-level character (code point) of each "
           "byte; whitespace: str.isspace code points; the caches are cleared at the start of a call once they hold "
           "more than cache_limit entries")
      .def("encode_pieces", &ByteLevelBPEBinding::encode_pieces, py::arg("pieces"),
           "A tuple of ids for each pre-tokenized piece (str)")
      .def("encode_segments", &ByteLevelBPEBinding::encode_segments, py::arg("segments"), py::arg("split"),
           "A list of ids for each segment (str without added tokens), for the GPT-2 / Llama-3 patterns; "
           "split(list of str) returns each string's pre-tokenizer pieces")
      .def_property_readonly("cached_words", &ByteLevelBPEBinding::cached_words)
      .def_property_readonly("cached_pieces", &ByteLevelBPEBinding::cached_pieces)
      .def("has_word", &ByteLevelBPEBinding::has_word, py::arg("word"),
           "Whether the word cache holds `word` (UTF-8 bytes or str)");
}
