// window_scores: Inf-MLLM retrieval-window column scores of the cached keys, per (layer, kv_head).
//
// Specification: infmllm_ros/kvcache/reference.py::window_scores (Ning et al. 2024, Inf-MLLM,
// §3.2 attention saddles, §3.3 attention bias). For row r = (layer, kv_head), its G query heads
// and W window queries (query i sits at slot q_start + i), and every key slot j < length:
//   p[g,i,j] = softmax_j(q[g,i]·k[j] * scale + beta * j) over the keys query i sees (j <= q_start + i)
//   col[j]   = sum_{g,i} p[g,i,j] / G / (normalise ? max(1, #queries that see j) : 1)
//   out[j]   = col[j] + (decay != 0 ? decay * out[j] : 0)          (carry of earlier scores)
// Softmax is fp32 whatever the K/Q dtype. Slots >= length are not written.
//
// Three launches, none materialising the [G, W, length] logits:
//   1. window_partial: grid (rows, key tiles). Each thread holds 32 dims of one key in registers
//      (P = head_dim / 32 threads per key); per query the dot is reduced over the P lanes, and
//      the tile's logits of a batch of queries go to shared memory, where the max / sum-exp per
//      query and tile are reduced and written out.
//   2. window_lse: per (row, query), combine the tiles into the log-sum-exp.
//   3. window_columns: grid (rows, key tiles). Recompute the dots, add exp(logit - lse) of
//      every visible query into a per-key register, normalise, carry, store.
#include "kvcache_layout.cuh"

#define WS_PART 32    // head_dim elements per thread; head_dim must be 32, 64, 128 or 256
#define WS_BATCH 16   // queries staged in shared memory at a time
#define WS_MAX_QUERIES 2048  // G * W per row (shared lse table of window_columns)

// Stage queries [first, first + n) of a row (query index = g * W + i) as fp32 in shared memory.
// Each 32-dim part is padded to WS_PITCH floats: float4-aligned, and the P lanes of one key read
// different bank groups.
#define WS_PITCH 36
template <typename T>
__device__ void stage_queries(const T* __restrict__ q, float* qs, int64_t layer, int kv_head,
                              int q_heads, int group, int window, int head_dim, int first, int n) {
  const int pitch = head_dim / WS_PART * WS_PITCH;
  for (int x = threadIdx.x; x < n * head_dim; x += INFMLLM_THREADS) {
    const int local = x / head_dim, d = x % head_dim;
    const int qq = first + local, g = qq / window, i = qq % window;
    const int64_t head = layer * q_heads + (int64_t)kv_head * group + g;
    qs[local * pitch + d / WS_PART * WS_PITCH + d % WS_PART] = to_float(q[(head * window + i) * head_dim + d]);
  }
}

// This thread's key slot, its 32 dims in registers, and the dot with a staged query.
template <typename T>
__device__ __forceinline__ void load_key_part(const T* __restrict__ k, int64_t row, int j, int part,
                                              int length, int slots, int head_dim, float* kr) {
  for (int e = 0; e < WS_PART; ++e)
    kr[e] = j < length ? to_float(k[kv_offset(row, j, part * WS_PART + e, slots, head_dim)]) : 0.f;
}

__device__ __forceinline__ float dot_part(const float* kr, const float* qrow, int part, int parts) {
  const float4* qp = reinterpret_cast<const float4*>(qrow + part * WS_PITCH);
  float acc = 0.f;
  for (int e = 0; e < WS_PART / 4; ++e) {
    const float4 x = qp[e];
    acc = fmaf(kr[4 * e], x.x, acc);
    acc = fmaf(kr[4 * e + 1], x.y, acc);
    acc = fmaf(kr[4 * e + 2], x.z, acc);
    acc = fmaf(kr[4 * e + 3], x.w, acc);
  }
  for (int o = 1; o < parts; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc;
}

template <typename T>
__device__ void window_partial(const T* __restrict__ q, const T* __restrict__ k, float* part_m,
                               float* part_s, int kv_heads, int q_heads, int window, int slots,
                               int head_dim, int length, int q_start, float scale, float beta) {
  __shared__ __align__(16) float qs[WS_BATCH * INFMLLM_MAX_HEAD_DIM / WS_PART * WS_PITCH];
  __shared__ float logits[WS_BATCH][INFMLLM_THREADS];  // [query in batch][key in tile]
  const int64_t row = blockIdx.x;
  const int64_t layer = row / kv_heads;
  const int kv_head = row % kv_heads, tile = blockIdx.y, tiles = gridDim.y;
  const int group = q_heads / kv_heads, queries = group * window;
  const int parts = head_dim / WS_PART, keys_per_tile = INFMLLM_THREADS / parts;
  const int part = threadIdx.x % parts, key = threadIdx.x / parts, j = tile * keys_per_tile + key;
  const int pitch = parts * WS_PITCH;
  // Reduction layout: WS_BATCH queries x (INFMLLM_THREADS / WS_BATCH) lanes, each lane a
  // strided share of the tile's keys.
  const int lanes = INFMLLM_THREADS / WS_BATCH, rq = threadIdx.x / lanes, rl = threadIdx.x % lanes;
  float kr[WS_PART];
  load_key_part(k, row, j, part, length, slots, head_dim, kr);
  for (int first = 0; first < queries; first += WS_BATCH) {
    const int n = min(WS_BATCH, queries - first);
    stage_queries(q, qs, layer, kv_head, q_heads, group, window, head_dim, first, n);
    __syncthreads();
    for (int b = 0; b < n; ++b) {
      const int i = (first + b) % window;
      const float dot = dot_part(kr, qs + b * pitch, part, parts);
      const bool seen = j < length && j <= q_start + i;
      if (part == 0) logits[b][key] = seen ? dot * scale + beta * (float)j : INFMLLM_NEG_INF;
    }
    __syncthreads();
    // Max and sum-exp of each query's logits over the tile's keys.
    float m = INFMLLM_NEG_INF, sum = 0.f;
    if (rq < n)
      for (int x = rl; x < keys_per_tile; x += lanes) m = fmaxf(m, logits[rq][x]);
    for (int o = lanes / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (rq < n && m != INFMLLM_NEG_INF)
      for (int x = rl; x < keys_per_tile; x += lanes)
        if (logits[rq][x] != INFMLLM_NEG_INF) sum += expf(logits[rq][x] - m);
    for (int o = lanes / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (rq < n && rl == 0) {
      const int64_t at = (row * queries + first + rq) * tiles + tile;
      part_m[at] = m;
      part_s[at] = sum;
    }
    __syncthreads();
  }
}

extern "C" __global__ void __launch_bounds__(INFMLLM_THREADS)
window_lse(const float* __restrict__ part_m, const float* __restrict__ part_s, float* lse,
           int queries, int tiles) {
  const int64_t row = blockIdx.x;
  for (int qq = threadIdx.x; qq < queries; qq += INFMLLM_THREADS) {
    const int64_t at = (row * queries + qq) * tiles;
    float m = INFMLLM_NEG_INF, s = 0.f;
    for (int t = 0; t < tiles; ++t) m = fmaxf(m, part_m[at + t]);
    for (int t = 0; t < tiles; ++t)
      if (part_m[at + t] != INFMLLM_NEG_INF) s += part_s[at + t] * expf(part_m[at + t] - m);
    lse[row * queries + qq] = m + logf(s);  // every query sees key 0, so s > 0
  }
}

template <typename T>
__device__ void window_columns(const T* __restrict__ q, const T* __restrict__ k,
                               const float* __restrict__ lse, float* out, int kv_heads, int q_heads,
                               int window, int slots, int head_dim, int length, int q_start,
                               float scale, float beta, int normalise, float decay) {
  __shared__ __align__(16) float qs[WS_BATCH * INFMLLM_MAX_HEAD_DIM / WS_PART * WS_PITCH];
  __shared__ float lse_s[WS_MAX_QUERIES];
  const int64_t row = blockIdx.x;
  const int64_t layer = row / kv_heads;
  const int kv_head = row % kv_heads, tile = blockIdx.y;
  const int group = q_heads / kv_heads, queries = group * window;
  const int parts = head_dim / WS_PART, keys_per_tile = INFMLLM_THREADS / parts;
  const int part = threadIdx.x % parts, j = tile * keys_per_tile + threadIdx.x / parts;
  const int pitch = parts * WS_PITCH;
  for (int qq = threadIdx.x; qq < queries; qq += INFMLLM_THREADS) lse_s[qq] = lse[row * queries + qq];
  float kr[WS_PART];
  load_key_part(k, row, j, part, length, slots, head_dim, kr);
  float acc = 0.f;
  for (int first = 0; first < queries; first += WS_BATCH) {
    const int n = min(WS_BATCH, queries - first);
    stage_queries(q, qs, layer, kv_head, q_heads, group, window, head_dim, first, n);
    __syncthreads();
    for (int b = 0; b < n; ++b) {
      const int i = (first + b) % window;
      const float dot = dot_part(kr, qs + b * pitch, part, parts);
      if (j < length && j <= q_start + i) acc += expf(dot * scale + beta * (float)j - lse_s[first + b]);
    }
    __syncthreads();
  }
  if (part == 0 && j < length) {
    float col = acc / (float)group;
    if (normalise) col /= fmaxf(1.f, (float)(window - max(0, j - q_start)));
    float* o = out + row * (int64_t)slots + j;
    *o = decay != 0.f ? decay * *o + col : col;
  }
}

#define INFMLLM_WINDOW(SUFFIX, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(INFMLLM_THREADS) window_partial_##SUFFIX(        \
      const T* q, const T* k, float* part_m, float* part_s, int kv_heads, int q_heads,          \
      int window, int slots, int head_dim, int length, int q_start, float scale, float beta) {  \
    window_partial<T>(q, k, part_m, part_s, kv_heads, q_heads, window, slots, head_dim, length, \
                      q_start, scale, beta);                                                    \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(INFMLLM_THREADS) window_columns_##SUFFIX(        \
      const T* q, const T* k, const float* lse, float* out, int kv_heads, int q_heads,          \
      int window, int slots, int head_dim, int length, int q_start, float scale, float beta,    \
      int normalise, float decay) {                                                             \
    window_columns<T>(q, k, lse, out, kv_heads, q_heads, window, slots, head_dim, length,       \
                      q_start, scale, beta, normalise, decay);                                  \
  }

INFMLLM_WINDOW(f32, float)
INFMLLM_WINDOW(f16, __half)
