// Byte-level BPE as Hugging Face `tokenizers` runs it for GPT-2 / Llama-3 style tokenizer.json
// models (pure C++, bound in csrc/helpers.cpp as megalign._helpers.ByteLevelBPE).
//
// BytePairModel works on raw UTF-8 bytes: byte-level BPE maps each byte to one character, so a
// token's characters are its bytes and the model is the same one over bytes. Merging follows
// tokenizers' Word::merge_all: a min-heap of (rank, position) over adjacent pairs, a popped pair
// used only while its two symbols are still there; with ignore_merges a piece that is itself a
// token is that token. SpaceCutEncoder adds the word cache of megalign/data/fast_bpe.py (see its
// docstring for why cutting before single spaces keeps the GPT-2 / Llama-3 pre-tokenizer's pieces):
// it splits texts on ' ', answers known words from its cache and lists what needs the regex (new
// clean words, chunks around unsafe cuts); the caller splits those into pieces, and the encoder
// runs BPE on new pieces and assembles the ids.
#ifndef MEGALIGN_BPE_BYTE_LEVEL_BPE_H
#define MEGALIGN_BPE_BYTE_LEVEL_BPE_H

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <queue>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace megalign {
namespace bpe {

// Bytes of the UTF-8 sequence a lead byte starts.
inline size_t utf8_length(unsigned char lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

// The code point starting at text[at] (valid UTF-8).
inline uint32_t decode_utf8(std::string_view text, size_t at) {
  const auto byte = [&](size_t i) { return static_cast<uint32_t>(static_cast<unsigned char>(text[i])); };
  const uint32_t lead = byte(at);
  if (lead < 0x80) return lead;
  if (lead < 0xE0) return ((lead & 0x1F) << 6) | (byte(at + 1) & 0x3F);
  if (lead < 0xF0) return ((lead & 0x0F) << 12) | ((byte(at + 1) & 0x3F) << 6) | (byte(at + 2) & 0x3F);
  return ((lead & 0x07) << 18) | ((byte(at + 1) & 0x3F) << 12) | ((byte(at + 2) & 0x3F) << 6) | (byte(at + 3) & 0x3F);
}

// Token ids memoized by byte string: open addressing over entries whose keys and ids live in two
// arenas (one allocation each, however many entries), found by a 64-bit hash.
class IdCache {
 public:
  // The entry of `key`, or -1.
  int64_t find(std::string_view key) const { return find(key, hash(key)); }
  int64_t find(std::string_view key, uint64_t key_hash) const {
    if (slots_.empty()) return -1;
    const size_t mask = slots_.size() - 1;
    for (size_t at = static_cast<size_t>(key_hash) & mask;; at = (at + 1) & mask) {
      const Slot slot = slots_[at];
      if (slot.entry == 0) return -1;
      if (slot.hash == key_hash) {
        const Entry& entry = entries_[slot.entry - 1];
        if (entry.key_size == key.size() && std::memcmp(keys_.data() + entry.key_offset, key.data(), key.size()) == 0)
          return static_cast<int64_t>(slot.entry - 1);
      }
    }
  }
  // Stores ids[begin, end) under `key` (not yet present); returns its entry.
  uint32_t insert(std::string_view key, const std::vector<int32_t>& ids, size_t begin, size_t end) {
    if ((entries_.size() + 1) * 2 > slots_.size()) grow();
    const uint32_t index = static_cast<uint32_t>(entries_.size());
    entries_.push_back({keys_.size(), key.size(), ids_.size(), end - begin});
    keys_.append(key);
    ids_.insert(ids_.end(), ids.begin() + static_cast<std::ptrdiff_t>(begin),
                ids.begin() + static_cast<std::ptrdiff_t>(end));
    place(hash(key), index);
    return index;
  }
  void append(uint32_t entry, std::vector<int32_t>& out) const {
    const Entry& span = entries_[entry];
    out.insert(out.end(), ids_.begin() + static_cast<std::ptrdiff_t>(span.ids_offset),
               ids_.begin() + static_cast<std::ptrdiff_t>(span.ids_offset + span.ids_size));
  }
  size_t size() const { return entries_.size(); }
  void clear() {
    slots_.clear();
    entries_.clear();
    keys_.clear();
    ids_.clear();
  }

  static uint64_t hash(std::string_view key) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ key.size();
    size_t i = 0;
    for (; i + 8 <= key.size(); i += 8) {
      uint64_t word;
      std::memcpy(&word, key.data() + i, 8);
      h = mix(h ^ word);
    }
    uint64_t tail = 0;
    std::memcpy(&tail, key.data() + i, key.size() - i);
    return mix(h ^ tail);
  }

 private:
  struct Entry {
    size_t key_offset;
    size_t key_size;
    size_t ids_offset;
    size_t ids_size;
  };
  struct Slot {
    uint64_t hash = 0;
    uint32_t entry = 0;  // entry index + 1; 0: empty
  };
  static uint64_t mix(uint64_t h) {
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
    return h ^ (h >> 31);
  }
  void place(uint64_t key_hash, uint32_t index) {
    const size_t mask = slots_.size() - 1;
    size_t at = static_cast<size_t>(key_hash) & mask;
    while (slots_[at].entry != 0) at = (at + 1) & mask;
    slots_[at] = {key_hash, index + 1};
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 1024 : old.size() * 2, Slot{});
    for (const Slot& slot : old)
      if (slot.entry != 0) place(slot.hash, slot.entry - 1);
  }

  std::vector<Slot> slots_;
  std::vector<Entry> entries_;
  std::string keys_;
  std::vector<int32_t> ids_;
};

// (left id, right id) -> (rank, merged id): open addressing over a power-of-two table, the lookup
// BPE does for every adjacent pair.
class MergeTable {
 public:
  struct Value {
    uint32_t rank;
    int32_t merged;
  };

  void assign(uint64_t key, Value value) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    Slot& slot = slots_[probe(key)];
    if (slot.key == kEmpty) ++size_;
    slot = {key, value};
  }
  const Value* find(uint64_t key) const {
    if (slots_.empty()) return nullptr;
    const Slot& slot = slots_[probe(key)];
    return slot.key == key ? &slot.value : nullptr;
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // never a key: ids are non-negative int32
  struct Slot {
    uint64_t key = kEmpty;
    Value value{0, 0};
  };
  size_t probe(uint64_t key) const {
    const size_t mask = slots_.size() - 1;
    size_t at = static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    while (slots_[at].key != kEmpty && slots_[at].key != key) at = (at + 1) & mask;
    return at;
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 1024 : old.size() * 2, Slot{});
    for (const Slot& slot : old)
      if (slot.key != kEmpty) slots_[probe(slot.key)] = slot;
  }

  std::vector<Slot> slots_;
  size_t size_ = 0;
};

// The BPE model of a byte-level tokenizer.json over raw bytes.
class BytePairModel {
 public:
  struct Merge {
    std::string left;
    std::string right;
    uint32_t rank;
  };

  // vocab: token bytes -> id; merges in rank order (a later duplicate pair wins, as in tokenizers).
  BytePairModel(const std::vector<std::pair<std::string, int32_t>>& vocab, const std::vector<Merge>& merges,
                bool ignore_merges)
      : ignore_merges_(ignore_merges) {
    for (const auto& [token, id] : vocab) vocab_[token] = id;
    for (int byte = 0; byte < 256; ++byte) {
      const auto it = vocab_.find(std::string(1, static_cast<char>(byte)));
      if (it == vocab_.end())
        throw std::invalid_argument("byte-level BPE: the vocabulary has no token for byte " + std::to_string(byte));
      byte_ids_[byte] = it->second;
    }
    for (const Merge& merge : merges) {
      const auto left = vocab_.find(merge.left);
      const auto right = vocab_.find(merge.right);
      const auto merged = vocab_.find(merge.left + merge.right);
      if (left == vocab_.end() || right == vocab_.end() || merged == vocab_.end())
        throw std::invalid_argument("byte-level BPE: a merge names a token missing from the vocabulary");
      merges_.assign(pair_key(left->second, right->second), {merge.rank, merged->second});
    }
  }

  // Appends the ids of one pre-tokenized piece (its UTF-8 bytes).
  void encode(std::string_view piece, std::vector<int32_t>& out) {
    if (piece.empty()) return;
    if (ignore_merges_) {
      const auto it = vocab_.find(std::string(piece));
      if (it != vocab_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    const int32_t n = static_cast<int32_t>(piece.size());
    if (n <= kShortPiece) {
      encode_short(piece, out);
      return;
    }
    symbols_.resize(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i)
      symbols_[i] = {byte_ids_[static_cast<unsigned char>(piece[static_cast<size_t>(i)])], i - 1,
                     i + 1 < n ? i + 1 : -1, 1};
    heap_ = {};
    for (int32_t i = 0; i + 1 < n; ++i) push_pair(i);
    while (!heap_.empty()) {
      const Candidate top = heap_.top();
      heap_.pop();
      Symbol& left = symbols_[top.pos];
      if (left.len == 0 || left.next < 0) continue;
      Symbol& right = symbols_[left.next];
      const MergeTable::Value* merge = merges_.find(pair_key(left.id, right.id));
      if (merge == nullptr || merge->merged != top.new_id) continue;  // a stale pair
      left.id = top.new_id;
      left.len += right.len;
      right.len = 0;
      left.next = right.next;
      if (left.next >= 0) symbols_[left.next].prev = top.pos;
      if (left.prev >= 0) push_pair(left.prev);
      push_pair(top.pos);
    }
    for (int32_t i = 0; i >= 0; i = symbols_[i].next) out.push_back(symbols_[i].id);
  }

 private:
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    int32_t len;
  };
  struct Candidate {
    uint32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator<(const Candidate& other) const {  // std::priority_queue is a max-heap: invert
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };

  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }
  void push_pair(int32_t pos) {
    const Symbol& left = symbols_[pos];
    if (left.next < 0) return;
    const MergeTable::Value* merge = merges_.find(pair_key(left.id, symbols_[left.next].id));
    if (merge != nullptr) heap_.push({merge->rank, pos, merge->merged});
  }
  uint32_t rank_of(int32_t left, int32_t right) const {
    const MergeTable::Value* merge = merges_.find(pair_key(left, right));
    return merge == nullptr ? kNoMerge : merge->rank;
  }

  // The same merges for short pieces without the heap: repeatedly merge the leftmost pair of lowest
  // rank (the heap's (rank, position) order; a merged pair's neighbours are re-ranked).
  void encode_short(std::string_view piece, std::vector<int32_t>& out) {
    const size_t n = piece.size();
    int32_t ids[kShortPiece];
    uint32_t ranks[kShortPiece];  // ranks[i]: the pair (ids[i], ids[i + 1])
    for (size_t i = 0; i < n; ++i) ids[i] = byte_ids_[static_cast<unsigned char>(piece[i])];
    size_t count = n;
    for (size_t i = 0; i + 1 < count; ++i) ranks[i] = rank_of(ids[i], ids[i + 1]);
    while (count > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < count; ++i)
        if (ranks[i] < ranks[best]) best = i;
      if (ranks[best] == kNoMerge) break;
      ids[best] = merges_.find(pair_key(ids[best], ids[best + 1]))->merged;
      for (size_t i = best + 1; i + 1 < count; ++i) ids[i] = ids[i + 1];
      for (size_t i = best + 1; i + 2 < count; ++i) ranks[i] = ranks[i + 1];
      --count;
      if (best > 0) ranks[best - 1] = rank_of(ids[best - 1], ids[best]);
      if (best + 1 < count) ranks[best] = rank_of(ids[best], ids[best + 1]);
    }
    out.insert(out.end(), ids, ids + count);
  }

  static constexpr int32_t kShortPiece = 64;  // longer pieces use the heap (no quadratic rescans)
  static constexpr uint32_t kNoMerge = ~uint32_t{0};

  bool ignore_merges_;
  std::unordered_map<std::string, int32_t> vocab_;
  MergeTable merges_;
  int32_t byte_ids_[256];
  std::vector<Symbol> symbols_;
  std::priority_queue<Candidate> heap_;
};

// BytePairModel with a piece cache plus the space-cut word cache (see the header comment).
class SpaceCutEncoder {
 public:
  // whitespace: the code points Python's str.isspace accepts (a superset of the patterns' \s).
  SpaceCutEncoder(BytePairModel model, const std::vector<uint32_t>& whitespace, size_t cache_limit)
      : model_(std::move(model)), cache_limit_(cache_limit), whitespace_(0x110000, false) {
    for (uint32_t code : whitespace)
      if (code < whitespace_.size()) whitespace_[code] = true;
  }

  // What a batch needs from the regex: `texts()` to split, then finish() with their pieces.
  class Batch {
   public:
    const std::vector<std::string>& texts() const { return texts_; }

   private:
    friend class SpaceCutEncoder;
    enum Kind : uint8_t { kMiss, kCached, kChunk, kEmpty, kNewWord };
    struct Ref {
      Kind kind;
      uint32_t index;
    };
    std::vector<std::vector<Ref>> refs_;          // per segment, per space-separated word
    std::vector<std::string_view> new_words_;     // distinct new clean words, in first-seen order
    std::vector<std::string> texts_;              // [" " + new words joined by " "] + chunks
  };

  // Ids of pieces (UTF-8), concatenated into `out`; ends[i] is where piece i's ids end.
  void encode_pieces(const std::vector<std::string_view>& pieces, std::vector<int32_t>& out,
                     std::vector<size_t>* ends = nullptr) {
    for (std::string_view piece : pieces) {
      int64_t entry = pieces_.find(piece);
      if (entry < 0) {
        scratch_.clear();
        model_.encode(piece, scratch_);
        entry = pieces_.insert(piece, scratch_, 0, scratch_.size());
      }
      pieces_.append(static_cast<uint32_t>(entry), out);
      if (ends != nullptr) ends->push_back(out.size());
    }
  }

  // Splits each segment on ' ' and resolves what the caches know.
  Batch plan(const std::vector<std::string_view>& segments) {
    if (words_.size() > cache_limit_) words_.clear();
    if (pieces_.size() > cache_limit_) pieces_.clear();
    Batch batch;
    batch.texts_.emplace_back();  // " " + the new words joined by " " (empty when there are none)
    batch.refs_.resize(segments.size());
    std::unordered_map<std::string_view, uint32_t> pending;
    std::vector<std::string_view> words;
    std::vector<size_t> misses;
    for (size_t s = 0; s < segments.size(); ++s) {
      split_spaces(segments[s], words);
      const size_t last = words.size();
      std::vector<Batch::Ref>& found = batch.refs_[s];
      found.assign(last, {Batch::kMiss, 0});
      misses.clear();
      misses.push_back(0);  // the first word has no space before it
      for (size_t i = 1; i < last; ++i) {
        const int64_t entry = words_.find(words[i]);
        if (entry < 0)
          misses.push_back(i);
        else
          found[i] = {Batch::kCached, static_cast<uint32_t>(entry)};
      }
      std::vector<size_t> lone;
      size_t end = 0;
      for (size_t index : misses) {
        if (index < end) continue;
        std::string_view word = words[index];
        if (index > 0 && !word.empty() && !words[index - 1].empty() && !space_first(word) && !space_last(word) &&
            !space_last(words[index - 1]) &&
            (index + 1 == last || (!words[index + 1].empty() && !space_first(words[index + 1])))) {
          lone.push_back(index);
          end = index + 1;
          continue;
        }
        size_t start = index;
        end = index + 1;
        while (start > 0 && !safe_cut(words[start - 1], words[start])) --start;
        while (end < last && !safe_cut(words[end - 1], words[end])) ++end;
        std::string chunk = start > 0 ? " " : "";
        for (size_t j = start; j < end; ++j) {
          if (j > start) chunk.push_back(' ');
          chunk.append(words[j]);
        }
        found[start] = {Batch::kChunk, static_cast<uint32_t>(batch.texts_.size())};
        batch.texts_.push_back(std::move(chunk));
        for (size_t j = start + 1; j < end; ++j) found[j] = {Batch::kEmpty, 0};
      }
      for (size_t index : lone) {
        const auto [it, added] = pending.emplace(words[index], static_cast<uint32_t>(batch.new_words_.size()));
        if (added) batch.new_words_.push_back(words[index]);
        found[index] = {Batch::kNewWord, it->second};
      }
    }
    std::string& joined = batch.texts_[0];
    for (std::string_view word : batch.new_words_) {
      joined.push_back(' ');
      joined.append(word);
    }
    return batch;
  }

  // Ids of every segment of `batch`, given the pieces of each of batch.texts() (in order); `offsets`
  // gets segments + 1 entries into `ids`.
  void finish(const Batch& batch, const std::vector<std::vector<std::string_view>>& pieces, std::vector<int32_t>& ids,
              std::vector<size_t>& offsets) {
    if (pieces.size() != batch.texts_.size()) throw std::invalid_argument("finish: one piece list per text needed");
    for (size_t t = 0; t < pieces.size(); ++t) {
      size_t total = 0;
      for (std::string_view piece : pieces[t]) total += piece.size();
      if (total != batch.texts_[t].size()) throw std::invalid_argument("finish: pieces do not cover their text");
    }
    // New words: " " + word i owns the pieces up to the one ending at its end (the cuts are safe).
    std::vector<uint32_t> word_entries(batch.new_words_.size());
    if (!batch.new_words_.empty()) {
      std::vector<int32_t> flat;
      std::vector<size_t> ends;
      encode_pieces(pieces[0], flat, &ends);
      size_t piece = 0, byte_end = 0, piece_byte_end = 0, ids_begin = 0;
      for (size_t i = 0; i < batch.new_words_.size(); ++i) {
        byte_end += 1 + batch.new_words_[i].size();
        while (piece < pieces[0].size() && piece_byte_end < byte_end) piece_byte_end += pieces[0][piece++].size();
        if (piece_byte_end != byte_end) throw std::logic_error("finish: a word boundary falls inside a piece");
        const size_t ids_end = ends[piece - 1];
        word_entries[i] = words_.insert(batch.new_words_[i], flat, ids_begin, ids_end);
        ids_begin = ids_end;
      }
    }
    std::vector<std::pair<size_t, size_t>> chunks(pieces.size());
    std::vector<int32_t> chunk_ids;
    for (size_t t = 1; t < pieces.size(); ++t) {
      chunks[t].first = chunk_ids.size();
      encode_pieces(pieces[t], chunk_ids);
      chunks[t].second = chunk_ids.size();
    }
    offsets.assign(1, ids.size());
    for (const auto& found : batch.refs_) {
      for (const Batch::Ref& ref : found) {
        switch (ref.kind) {
          case Batch::kCached: words_.append(ref.index, ids); break;
          case Batch::kNewWord: words_.append(word_entries[ref.index], ids); break;
          case Batch::kChunk:
            ids.insert(ids.end(), chunk_ids.begin() + static_cast<std::ptrdiff_t>(chunks[ref.index].first),
                       chunk_ids.begin() + static_cast<std::ptrdiff_t>(chunks[ref.index].second));
            break;
          case Batch::kEmpty: break;
          case Batch::kMiss: throw std::logic_error("finish: a word was left unresolved");
        }
      }
      offsets.push_back(ids.size());
    }
  }

  size_t cached_words() const { return words_.size(); }
  size_t cached_pieces() const { return pieces_.size(); }
  bool has_word(std::string_view word) const { return words_.find(word) >= 0; }

 private:
  static void split_spaces(std::string_view text, std::vector<std::string_view>& words) {
    words.clear();
    size_t start = 0;
    for (;;) {
      const size_t space = text.find(' ', start);
      if (space == std::string_view::npos) {
        words.push_back(text.substr(start));
        return;
      }
      words.push_back(text.substr(start, space - start));
      start = space + 1;
    }
  }
  bool is_space(uint32_t code) const { return code < whitespace_.size() && whitespace_[code]; }
  bool space_first(std::string_view word) const { return is_space(decode_utf8(word, 0)); }
  bool space_last(std::string_view word) const {
    size_t at = word.size() - 1;
    while (at > 0 && (static_cast<unsigned char>(word[at]) & 0xC0) == 0x80) --at;
    return is_space(decode_utf8(word, at));
  }
  bool safe_cut(std::string_view left, std::string_view right) const {
    return !left.empty() && !right.empty() && !space_last(left) && !space_first(right);
  }

  BytePairModel model_;
  size_t cache_limit_;
  std::vector<bool> whitespace_;
  IdCache words_;   // clean word -> ids of " " + word
  IdCache pieces_;  // piece -> ids
  std::vector<int32_t> scratch_;
};

}  // namespace bpe
}  // namespace megalign

#endif  // MEGALIGN_BPE_BYTE_LEVEL_BPE_H
