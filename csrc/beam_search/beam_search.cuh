// Step beam_search: one step of Hugging Face transformers' vectorised beam search (torch-free).
//
// Two kernels, no host synchronisation:
//   candidates_kernel  grid (splits, rows): each block reads one slice of one beam row once and
//                      keeps its C best logits (64-bit rank keys: value, then lower index) and
//                      the slice's max and sum of exp(x - max) (slice_top_keys.cuh);
//   update_kernel      grid (requests): merges its beams' slices into log-probabilities plus the
//                      beam scores, ranks the C best continuations (ties: lower beam * vocab +
//                      token first) and applies transformers' running-beam, finished-pool and
//                      early-stop rules to the state in place. It is launched as a programmatic
//                      dependent: its blocks start (and read the state) while candidates_kernel
//                      runs, then wait for it, so no launch gap lies between the two.
// The beams x vocab log-probabilities are never written: only C keys per slice.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "dependent_launch.cuh"
#include "rank_key.cuh"
#include "slice_top_keys.cuh"
#include "warp_reduce.cuh"

namespace xllm::beam {

using slice::combine;
using slice::kCapacity;
using slice::kFull;
using slice::kInf;
using slice::kLog2e;
using slice::kMinSlice;
using slice::kStreamBytes;
using slice::kThreads;
using slice::select_top;
using slice::Select;

constexpr int kMaxCandidates = slice::kMaxKeys;  // C = max(2, 1 + EOS ids) * beams
constexpr int kMaxBeams = 32;
constexpr float kNeg = -1.0e9f;      // transformers' score of a dead beam or an empty slot

struct Workspace {
  uint64_t* keys;     // (rows, splits, C) each slice's C best raw-logit keys; 0 pads
  float2* partial;    // (rows, splits) (max, sum of exp(x - max)); NaN sum: a NaN logit
  int64_t* step;      // the step this launch pair advances (read before update_kernel moves it)
  float* divisor;     // (2,) that step's (generated length) ** length_penalty: its hypotheses', the early-stop heuristic's
};

// The length penalty's terms, which candidates_kernel computes for update_kernel (off its chain).
struct Lengths {
  int64_t prompt_len, max_length;
  double length_penalty;
  int early_stopping;  // 0: False, 1: True, 2: "never"
};

// The divisors of step `step`: this step's hypotheses (the generated length including the EOS) and
// the early-stop heuristic's best possible length ("never" with a positive penalty: max_length).
__device__ inline void length_divisors(int64_t step, const Lengths& l, float* divisor) {
  const int64_t cur_len = l.prompt_len + step;
  const bool never = l.early_stopping == 2 && l.length_penalty > 0.0;
  const int64_t best_length = (never ? l.max_length : cur_len + 1) - l.prompt_len;
  divisor[0] = static_cast<float>(pow(static_cast<double>(cur_len + 1 - l.prompt_len), l.length_penalty));
  divisor[1] = static_cast<float>(pow(static_cast<double>(best_length), l.length_penalty));
}

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
  Lengths lengths;
};


// Grid (slices, beam rows), kThreads threads, kStreamBytes of dynamic shared memory: each block
// the c best keys and the softmax partial of its slice of a beam row (BULK: see slice_top_keys).
template <typename T, bool BULK>
__global__ void __launch_bounds__(kThreads, 2) candidates_kernel(const T* __restrict__ logits, int64_t vocab,
                                                                  int64_t chunk, int c, Workspace ws, const int64_t* steps,
                                                                  Lengths lengths) {
  const int64_t row = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  const int64_t begin = split * chunk, end = min(begin + chunk, vocab);
  xllm::launch_dependents();  // update_kernel's blocks may take free room now; they wait for this grid
  if (threadIdx.x == 0 && row == 0 && split == 0) {
    const int64_t step = *steps;
    *ws.step = step;
    length_divisors(step, lengths, ws.divisor);
  }
  const slice::Partial<float> p = slice::slice_top_keys<T, BULK, float, true>(logits + row * vocab, begin, end, c, kLog2e,
                                                                        ws.keys + (row * splits + split) * c);
  if (threadIdx.x == 0) ws.partial[row * splits + split] = make_float2(p.max, p.sum);
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
#pragma unroll 4  // independent shared loads: the loop is bound by their latency
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
  __shared__ int64_t eos[kMaxCandidates];  // C >= 1 + the EOS ids
  const int b = blockIdx.x, W = st.beams, C = st.candidates;
  const int64_t prompt_len = st.lengths.prompt_len, max_length = st.lengths.max_length;
  // 0. the state before this step (not written by candidates_kernel: read while it may still run)
  if (threadIdx.x < W) {
    const int64_t slot = static_cast<int64_t>(b) * W + threadIdx.x;
    merged[threadIdx.x] = {st.pool_scores[slot], st.pool_finished[slot], st.pool_step[slot], st.pool_parent[slot],
                           st.pool_token[slot]};
    beam_score[threadIdx.x] = st.running_scores[slot];
  }
  if (threadIdx.x == 0) improvable = st.improvable[b];
  for (int e = threadIdx.x; e < st.n_eos; e += kThreads) eos[e] = st.eos[e];
  xllm::wait_for_prerequisite();
  // 1. the slices' raw keys (loaded alongside the step and the length penalties' divisors) and
  // each beam's log-softmax shift (NaN: a NaN logit or only -inf, no continuation)
  const int64_t step = *ws.step, n_new = max_length - prompt_len;
  const float divisor[2] = {ws.divisor[0], ws.divisor[1]};
  const int per_beam = splits * C, n = W * per_beam;
  for (int i = threadIdx.x; i < n; i += kThreads) keys[i] = ws.keys[static_cast<int64_t>(b) * n + i];
  if (step >= n_new) return;  // at max_length already: nothing to advance
  const int64_t cur_len = prompt_len + step;
  const int lane = threadIdx.x % 32;
  for (int beam = threadIdx.x / 32; beam < W; beam += kThreads / 32) {  // a warp per beam: its slices' partials
    const int64_t row = static_cast<int64_t>(b) * W + beam;
    float m = -kInf, s = 0.f;
    for (int i = lane; i < splits; i += 32) combine(m, s, ws.partial[row * splits + i].x, ws.partial[row * splits + i].y, kLog2e);
    slice::warp_combine(m, s, kLog2e);
    if (lane == 0) {
      const bool dead = m == -kInf || s != s;
      beam_max[beam] = dead ? __int_as_float(0x7fc00000) : m;
      beam_log_sum[beam] = logf(s);
    }
  }
  if (threadIdx.x == 0) count = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    bool full = true;
    for (int w = 0; w < W; ++w) full &= merged[w].finished;
    pool_full = full && st.lengths.early_stopping == 1;
  }
  // 2. every slice's keys rescored as cumulative log-probabilities: ((x - max) - log(sum)) + score
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int beam = i / per_beam;
    const uint64_t raw = keys[i];
    const float m = beam_max[beam];
    const float score = m == m ? ((rank_value(raw) - m) - beam_log_sum[beam]) + beam_score[beam] : -kInf;
    keys[i] = raw ? rank_key(score, beam * vocab + rank_index(raw)) : 0;
  }
  __syncthreads();
  // 3. the C best, ranked
  select_top<true>(keys, &count, C, ranked, sel);
  if (threadIdx.x < C) {
    const uint64_t key = ranked[threadIdx.x];
    const int64_t flat = rank_index(key);
    const int64_t token = flat % vocab;
    bool hit = cur_len + 1 >= max_length;
    for (int e = 0; e < st.n_eos; ++e) hit |= token == eos[e];
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
    float s = cand[c].score / divisor[0];
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
    float best_running = cand[0].running;
    for (int c = 1; c < C; ++c) best_running = fmaxf(best_running, cand[c].running);
    // the new running beam 0 is the best running value (first by rank on ties)
    const float best = best_running / divisor[1];
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
