// Step beam_search: one step of Hugging Face transformers' vectorised beam search (torch-free).
//
// Two kernels, no host synchronisation:
//   candidates_kernel  grid (splits, rows): each block reads one slice of one beam row once and
//                      keeps its C best logits (64-bit rank keys: value, then lower index) in a
//                      shared buffer behind a rising threshold, and the slice's max and
//                      sum of exp(x - max) (an online softmax);
//   update_kernel      grid (requests): merges its beams' slices into log-probabilities plus the
//                      beam scores, ranks the C best continuations (ties: lower beam * vocab +
//                      token first) and applies transformers' running-beam, finished-pool and
//                      early-stop rules to the state in place.
// The beams x vocab log-probabilities are never written: only C keys per slice.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "rank_key.cuh"
#include "vector_load.cuh"

namespace xllm::beam {

constexpr int kThreads = 256;
constexpr int kCapacity = 4096;      // keys a block buffers (32 KiB)
constexpr int kTile = 2048;          // elements a block reads between two threshold checks
constexpr int kMaxCandidates = 128;  // C = max(2, 1 + EOS ids) * beams
constexpr int kMaxBeams = 32;
constexpr float kNeg = -1.0e9f;      // transformers' score of a dead beam or an empty slot
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr float kInf = __builtin_huge_valf();

struct Workspace {
  uint64_t* keys;     // (rows, splits, C) each slice's C best raw-logit keys; 0 pads
  float2* partial;    // (rows, splits) (max, sum of exp(x - max)); NaN sum: a NaN logit
  int64_t* step;      // the step this launch pair advances (read before update_kernel moves it)
};

struct State {
  const int64_t* eos;  // (n_eos,)
  int n_eos;
  int64_t* steps;  // () steps taken
  float* running_scores;  // (B, W)
  int64_t* history_tokens;  // (B, W, N)
  int64_t* history_parents;  // (B, W, N)
  float* pool_scores;  // (B, W)
  bool* pool_finished;  // (B, W)
  int64_t* pool_step;  // (B, W)
  int64_t* pool_parent;  // (B, W)
  int64_t* pool_token;  // (B, W)
  bool* improvable;  // (B,)
  bool* all_hit;  // (B,)
  int beams, candidates;
  int64_t prompt_len, max_length;
  double length_penalty;
  int early_stopping;  // 0: False, 1: True, 2: "never"
};

struct Select {
  int hist[256];
  int digit, above;
  uint64_t floor;
  uint64_t seeds[kThreads];
};

// The k-th largest of keys[0, n) (1 <= k <= n, keys distinct): an MSB-first radix select, 8 bits a round.
__device__ uint64_t kth_largest(const uint64_t* keys, int n, int k, Select& s) {
  uint64_t prefix = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s.hist[i] = 0;
    __syncthreads();
    const uint64_t high = shift == 56 ? 0 : ~0ull << (shift + 8);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint64_t key = keys[i];
      if ((key & high) == prefix) atomicAdd(&s.hist[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // lane l owns digits 255 - 8l down to 248 - 8l
      const int lane = threadIdx.x;
      int own = 0;
      for (int j = 0; j < 8; ++j) own += s.hist[255 - 8 * lane - j];
      int inclusive = own;
      for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(kFull, inclusive, off);
        if (lane >= off) inclusive += o;
      }
      int above = inclusive - own;
      if (above < k && k <= inclusive) {
        for (int j = 0; j < 8; ++j) {
          const int d = 255 - 8 * lane - j, c = s.hist[d];
          if (above + c >= k) {
            s.digit = d;
            s.above = above;
            break;
          }
          above += c;
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(s.digit) << shift;
    k -= s.above;
    __syncthreads();  // s is rewritten by the next round
  }
  return prefix;
}

// Append `key` where `take`, one shared atomic per warp; every lane of the warp calls it.
__device__ __forceinline__ void append(uint64_t* buffer, int* count, bool take, uint64_t key) {
  const unsigned mask = __ballot_sync(kFull, take);
  if (!mask) return;
  const int lane = threadIdx.x % 32;
  int base = 0;
  if (lane == __ffs(mask) - 1) base = atomicAdd(count, __popc(mask));
  base = __shfl_sync(kFull, base, __ffs(mask) - 1);
  if (take) buffer[base + __popc(mask & ((1u << lane) - 1))] = key;
}

// Keep the c largest of buffer[0, *count) (c < *count, *count read after a barrier); returns the c-th largest.
__device__ uint64_t keep_largest(uint64_t* buffer, int* count, int c, Select& s) {
  const int n = *count;
  const uint64_t kth = kth_largest(buffer, n, c, s);
  constexpr int kPer = kCapacity / kThreads;
  uint64_t mine[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads;
    mine[j] = i < n ? buffer[i] : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) *count = 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPer; ++j) append(buffer, count, mine[j] >= kth && mine[j] != 0, mine[j]);
  __syncthreads();
  return kth;
}

constexpr int kRankSelect = 512;  // up to this many keys, rank each by counting (one pass) instead of a radix select

// out[r] = the r-th largest of keys[0, n) for r < c (keys distinct where not 0; zeros are not ranked).
__device__ __forceinline__ void rank_select(const uint64_t* keys, int n, int c, uint64_t* out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint64_t key = keys[i];
    if (!key) continue;
    int r = 0;
    for (int j = 0; j < n; ++j) r += keys[j] > key;
    if (r < c) out[r] = key;
  }
}

// A key below the block's c best, from each thread's best key `mine`: the (c + 1)-th largest of
// the threads' bests (c of them are above it, so the c best are above it too; 0 when fewer than
// c + 1 threads have a key). Filtering by it leaves a few times c keys instead of all of them.
__device__ uint64_t seed_floor(uint64_t mine, int c, Select& s) {
  if (threadIdx.x == 0) s.floor = 0;
  s.seeds[threadIdx.x] = mine;
  __syncthreads();
  int r = 0;
  for (int k = 0; k < kThreads; ++k) r += s.seeds[k] > mine;
  if (r == c && mine) s.floor = mine;
  __syncthreads();
  const uint64_t floor = s.floor;
  __syncthreads();  // s is rewritten by the next call
  return floor;
}

// out[r] = the r-th largest of keys[0, *count) for r < c (*count read after a barrier, at most
// kCapacity; zeros are not keys): filter by seed_floor, then rank by counting, or by a radix
// select when many keys remain. keys and *count are overwritten.
__device__ void select_top(uint64_t* keys, int* count, int c, uint64_t* out, Select& s) {
  constexpr int kPer = kCapacity / kThreads;
  const int n = *count;
  uint64_t mine[kPer], best = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads;
    mine[j] = i < n ? keys[i] : 0;
    best = max(best, mine[j]);
  }
  const uint64_t floor = seed_floor(best, c, s);
  if (threadIdx.x == 0) *count = 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPer; ++j) append(keys, count, mine[j] > floor, mine[j]);
  __syncthreads();
  if (*count <= kRankSelect) {
    rank_select(keys, *count, c, out);
  } else {
    keep_largest(keys, count, c, s);
    rank_select(keys, c, c, out);
  }
  __syncthreads();
}

// Online softmax: fold (m2, s2) into (m, s), where s is a sum of exp(x - m).
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
  } else if (m2 != -kInf) {
    s += s2 * expf(m2 - m);
  } else {
    s += s2;  // keeps a NaN
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) candidates_kernel(const T* __restrict__ logits, int64_t vocab, int64_t chunk,
                                                               int c, Workspace ws, const int64_t* steps) {
  __shared__ uint64_t buffer[kCapacity];
  __shared__ Select sel;
  __shared__ int count;
  __shared__ float2 warp_partial[kThreads / 32];
  const int64_t row = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  const int64_t begin = split * chunk, end = min(begin + chunk, vocab);
  const T* x = logits + row * vocab;
  if (threadIdx.x == 0) {
    count = 0;
    if (row == 0 && split == 0) *ws.step = *steps;
  }
  float m = -kInf, s = 0.f;
  uint64_t floor_key = 0;  // keys at or below it cannot be among the slice's c best
  constexpr int kLoads = kTile / (kThreads * VEC);
  Vec<T, VEC> next[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int64_t i = begin + (u * kThreads + threadIdx.x) * VEC;
    if (i < end) next[u] = load<T, VEC>(x + i);
  }
  for (int64_t base = begin; base < end; base += kTile) {
    __syncthreads();
    if (count > kCapacity - kTile) floor_key = keep_largest(buffer, &count, c, sel);
    Vec<T, VEC> v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      v[u] = next[u];
      const int64_t i = base + kTile + (u * kThreads + threadIdx.x) * VEC;
      if (i < end) next[u] = load<T, VEC>(x + i);  // the next tile's loads fly during this tile's work
    }
    if (base == begin) {  // the first tile seeds the threshold: only keys above it are buffered
      uint64_t best = 0;
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int64_t i = base + (u * kThreads + threadIdx.x) * VEC;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float value = to_float(v[u].v[j]) + 0.f;
          if (i < end) best = max(best, rank_key(value == value ? value : -kInf, i + j));
        }
      }
      floor_key = seed_floor(best, c, sel);
    }
    const float floor_value = floor_key ? rank_value(floor_key) : -kInf;
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int64_t i = base + (u * kThreads + threadIdx.x) * VEC;
      const bool inside = i < end;
      float vmax = -kInf;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (inside) vmax = fmaxf(vmax, to_float(v[u].v[j]));
      if (vmax > m) {
        s *= expf(m - vmax);
        m = vmax;
      }
      bool any = false;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float value = inside ? to_float(v[u].v[j]) : -kInf;
        if (inside && m != -kInf) s += expf(value - m);
        if (value != value) s = value;  // a NaN marks the row (it then has no continuation)
        any |= inside && !(value < floor_value);
      }
      if (!__any_sync(kFull, any)) continue;  // once the threshold has risen, most vectors stop here
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float value = inside ? to_float(v[u].v[j]) + 0.f : -kInf;  // + 0: -0 ranks as +0
        const uint64_t key = rank_key(value == value ? value : -kInf, i + j);
        append(buffer, &count, inside && key > floor_key, key);
      }
    }
  }
  // the slice's softmax partial
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, off), s2 = __shfl_xor_sync(kFull, s, off);
    combine(m, s, m2, s2);
  }
  if (threadIdx.x % 32 == 0) warp_partial[threadIdx.x / 32] = make_float2(m, s);
  __syncthreads();
  uint64_t* out = ws.keys + (row * splits + split) * c;
  for (int i = count + threadIdx.x; i < c; i += kThreads) out[i] = 0;  // a slice of fewer than c elements
  select_top(buffer, &count, c, out, sel);
  if (threadIdx.x == 0) {
    float bm = -kInf, bs = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) combine(bm, bs, warp_partial[w].x, warp_partial[w].y);
    ws.partial[row * splits + split] = make_float2(bm, bs);
  }
}

struct Candidate {
  float score;    // cumulative log-probability
  float running;  // score, -1e9 lower where the continuation hit
  int64_t token;
  int beam;
  bool hit;
};

struct PoolEntry {
  float score;
  bool finished;
  int64_t step, parent, token;
};

// Rank of entry i among n by (value descending, position ascending).
template <typename F>
__device__ __forceinline__ int rank_of(int i, int n, F value) {
  const float v = value(i);
  int r = 0;
  for (int j = 0; j < n; ++j) {
    const float u = value(j);
    r += u > v || (u == v && j < i);
  }
  return r;
}

__global__ void __launch_bounds__(kThreads) update_kernel(int64_t vocab, int splits, Workspace ws, State st) {
  __shared__ uint64_t keys[kCapacity];
  __shared__ Select sel;
  __shared__ int count;
  __shared__ float beam_max[kMaxBeams], beam_log_sum[kMaxBeams], beam_score[kMaxBeams];
  __shared__ uint64_t ranked[kMaxCandidates];
  __shared__ Candidate cand[kMaxCandidates];
  __shared__ PoolEntry merged[kMaxBeams + kMaxCandidates];
  __shared__ bool pool_full, improvable;
  const int b = blockIdx.x, W = st.beams, C = st.candidates;
  const int64_t step = *ws.step, n_new = st.max_length - st.prompt_len;
  if (step >= n_new) return;  // at max_length already: nothing to advance
  const int64_t cur_len = st.prompt_len + step;
  // 1. each beam's log-softmax shift (NaN: a NaN logit or only -inf, no continuation)
  const int per_beam = splits * C, n = W * per_beam;
  const int lane = threadIdx.x % 32;
  for (int beam = threadIdx.x / 32; beam < W; beam += kThreads / 32) {  // a warp per beam: its slices' partials
    const int64_t row = static_cast<int64_t>(b) * W + beam;
    float m = -kInf, s = 0.f;
    for (int i = lane; i < splits; i += 32) combine(m, s, ws.partial[row * splits + i].x, ws.partial[row * splits + i].y);
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(kFull, m, off), s2 = __shfl_xor_sync(kFull, s, off);
      combine(m, s, m2, s2);
    }
    if (lane == 0) {
      const bool dead = m == -kInf || s != s;
      beam_max[beam] = dead ? __int_as_float(0x7fc00000) : m;
      beam_log_sum[beam] = logf(s);
      beam_score[beam] = st.running_scores[row];
    }
  }
  if (threadIdx.x < W) {  // the pool before this step
    const int64_t slot = static_cast<int64_t>(b) * W + threadIdx.x;
    merged[threadIdx.x] = {st.pool_scores[slot], st.pool_finished[slot], st.pool_step[slot], st.pool_parent[slot],
                           st.pool_token[slot]};
  }
  if (threadIdx.x == 0) {
    count = n;
    improvable = st.improvable[b];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    bool full = true;
    for (int w = 0; w < W; ++w) full &= merged[w].finished;
    pool_full = full && st.early_stopping == 1;
  }
  // 2. every slice's keys rescored as cumulative log-probabilities: ((x - max) - log(sum)) + score
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int beam = i / per_beam;
    const uint64_t raw = ws.keys[(static_cast<int64_t>(b) * W + beam) * per_beam + i % per_beam];
    const float m = beam_max[beam];
    const float score = m == m ? ((rank_value(raw) - m) - beam_log_sum[beam]) + beam_score[beam] : -kInf;
    keys[i] = raw ? rank_key(score, beam * vocab + rank_index(raw)) : 0;
  }
  __syncthreads();
  // 3. the C best, ranked
  select_top(keys, &count, C, ranked, sel);
  if (threadIdx.x < C) {
    const uint64_t key = ranked[threadIdx.x];
    const int64_t flat = rank_index(key);
    const int64_t token = flat % vocab;
    bool hit = cur_len + 1 >= st.max_length;
    for (int e = 0; e < st.n_eos; ++e) hit |= token == st.eos[e];
    const float score = rank_value(key);
    cand[threadIdx.x] = {score, score + (hit ? 1.f : 0.f) * kNeg, token, static_cast<int>(flat / vocab), hit};
  }
  __syncthreads();
  // 4. running beams: the W best continuations, hits 1e9 lower (ties: by rank)
  const int64_t n_hist = n_new;
  if (threadIdx.x < C) {
    const int c = threadIdx.x;
    const int r = rank_of(c, C, [&](int j) { return cand[j].running; });
    if (r < W) {
      const int64_t slot = static_cast<int64_t>(b) * W + r;
      st.running_scores[slot] = cand[c].running;
      st.history_tokens[slot * n_hist + step] = cand[c].token;
      st.history_parents[slot * n_hist + step] = cand[c].beam;
    }
    // 5. the finished pool's candidate: hits ranked inside the top W, unless the request is done
    const bool just = cand[c].hit && c < W;
    float s = cand[c].score / static_cast<float>(pow(static_cast<double>(cur_len + 1 - st.prompt_len), st.length_penalty));
    s += (pool_full ? 1.f : 0.f) * kNeg;
    s += (improvable ? 0.f : 1.f) * kNeg;
    s += (just ? 0.f : 1.f) * kNeg;
    merged[W + c] = {s, just, step, cand[c].beam, cand[c].token};
  }
  __syncthreads();
  PoolEntry kept;
  int kept_rank = W;
  if (threadIdx.x < W + C) {
    kept_rank = rank_of(threadIdx.x, W + C, [&](int j) { return merged[j].score; });
    kept = merged[threadIdx.x];
  }
  __syncthreads();
  if (kept_rank < W) merged[kept_rank] = kept;
  __syncthreads();
  if (threadIdx.x < W) {
    const int64_t slot = static_cast<int64_t>(b) * W + threadIdx.x;
    const PoolEntry& e = merged[threadIdx.x];
    st.pool_scores[slot] = e.score;
    st.pool_finished[slot] = e.finished;
    st.pool_step[slot] = e.step;
    st.pool_parent[slot] = e.parent;
    st.pool_token[slot] = e.token;
  }
  // 6. the early-stop heuristic at the new length, and whether every continuation hit
  if (threadIdx.x == 0) {
    const bool never = st.early_stopping == 2 && st.length_penalty > 0.0;
    const int64_t best_length = (never ? st.max_length : cur_len + 1) - st.prompt_len;
    float best_running = cand[0].running;
    for (int c = 1; c < C; ++c) best_running = fmaxf(best_running, cand[c].running);
    // the new running beam 0 is the best running value (first by rank on ties)
    const float best = best_running / static_cast<float>(pow(static_cast<double>(best_length), st.length_penalty));
    float worst = kInf;
    for (int w = 0; w < W; ++w) worst = fminf(worst, merged[w].score);
    bool any = false, all_hit = true;
    for (int w = 0; w < W; ++w) any |= best > (merged[w].finished ? worst : kNeg);
    for (int c = 0; c < C; ++c) all_hit &= cand[c].hit;
    st.improvable[b] = improvable && any;
    st.all_hit[b] = all_hit;
    if (b == 0) *st.steps = step + 1;
  }
}

}  // namespace xllm::beam
