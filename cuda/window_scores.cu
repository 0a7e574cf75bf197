// window_scores: Inf-MLLM retrieval-window column scores of the cached keys, per (layer, kv_head).
//
// Specification: infmllm_ros/kvcache/reference.py::window_scores (Ning et al. 2024, Inf-MLLM,
// §3.2 attention saddles, §3.3 attention bias). For row r = (layer, kv_head), its G query heads
// and W window queries (query i sits at slot q_start + i), and every key slot j < length:
//   p[g,i,j] = softmax_j(q[g,i]·k[j] * scale + beta * j) over the keys query i sees (j <= q_start + i)
//   col[j]   = sum_{g,i} p[g,i,j] / G / (normalise ? max(1, #queries that see j) : 1)
//   out[j]   = col[j] + (decay != 0 ? decay * out[j] : 0)          (carry of earlier scores)
// Softmax is fp32 whatever the K/Q dtype (exponentials by __expf: a few ulp, inside the parity
// tolerance). Slots >= length are not written.
//
// Three launches, none materialising the [G, W, length] logits:
//   1. window_partial: grid (rows, key tiles). Each thread holds 32 dims of one key in registers
//      (P = head_dim / 32 threads per key); per query the dot is reduced over the P lanes, and
//      the tile's logits of a batch of queries go to shared memory, where the max / sum-exp per
//      query and tile are reduced and written out.
//   2. window_lse: per (row, query), combine the tiles into the log-sum-exp.
//   3. window_columns: grid (rows, key tiles). Recompute the dots, add exp(logit - lse) of
//      every visible query into a per-key register, normalise, carry, store.
//
// fp16 with head_dim <= 128 takes the tensor-core path instead (window_partial_tc /
// window_columns_tc, same three steps): a block stages 128 keys in shared memory, and each warp
// multiplies a 16-query chunk by its 16 keys with mma.sync m16n8k16 (fp16 inputs, fp32
// accumulation: the products are exact, only the summation order differs from the fp32
// reference). Inline PTX rather than <mma.h>: NVRTC include paths (CuPy's wheels, JetPack)
// do not always carry the headers mma.h needs.
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
  // The row's G * W queries are contiguous in [layers, q_heads, W, head_dim]: heads
  // kv_head * G .. kv_head * G + G - 1 of the layer, W queries each.
  const T* src = q + ((layer * q_heads + (int64_t)kv_head * group) * window + first) * head_dim;
  const int shift = __ffs(head_dim) - 1, parts = head_dim / WS_PART;  // head_dim is a power of two
  for (int x = threadIdx.x; x < n * head_dim; x += INFMLLM_THREADS) {
    const int local = x >> shift, d = x & (head_dim - 1);
    qs[(local * parts + d / WS_PART) * WS_PITCH + d % WS_PART] = to_float(src[x]);
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

// For every query of the row, in batches staged in shared memory: this thread's partial dot
// with its key part (reduced over the key's P lanes) is handed to on_dot(b, qq, i, dot) (b: index
// in the batch, qq: query, i: window position); after_batch(first, n) runs between batches, with
// the block synchronised on both sides.
template <typename T, typename OnDot, typename AfterBatch>
__device__ void sweep_queries(const T* __restrict__ q, float* qs, const float* kr, int64_t layer, int kv_head,
                              int q_heads, int group, int window, int head_dim, int part, int parts,
                              OnDot on_dot, AfterBatch after_batch) {
  const int queries = group * window, pitch = parts * WS_PITCH;
  for (int first = 0; first < queries; first += WS_BATCH) {
    const int n = min(WS_BATCH, queries - first);
    stage_queries(q, qs, layer, kv_head, q_heads, group, window, head_dim, first, n);
    __syncthreads();
    for (int b = 0; b < n; ++b) on_dot(b, first + b, (first + b) % window, dot_part(kr, qs + b * pitch, part, parts));
    __syncthreads();
    after_batch(first, n);
    __syncthreads();
  }
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
  // Reduction layout: WS_BATCH queries x (INFMLLM_THREADS / WS_BATCH) lanes, each lane a
  // strided share of the tile's keys.
  const int lanes = INFMLLM_THREADS / WS_BATCH, rq = threadIdx.x / lanes, rl = threadIdx.x % lanes;
  float kr[WS_PART];
  load_key_part(k, row, j, part, length, slots, head_dim, kr);
  sweep_queries(q, qs, kr, layer, kv_head, q_heads, group, window, head_dim, part, parts,
      [&](int b, int, int i, float dot) {
        const bool seen = j < length && j <= q_start + i;
        if (part == 0) logits[b][key] = seen ? dot * scale + beta * (float)j : INFMLLM_NEG_INF;
      },
      [&](int first, int n) {  // max and sum-exp of each query's logits over the tile's keys
        float m = INFMLLM_NEG_INF, sum = 0.f;
        if (rq < n)
          for (int x = rl; x < keys_per_tile; x += lanes) m = fmaxf(m, logits[rq][x]);
        for (int o = lanes / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (rq < n && m != INFMLLM_NEG_INF)
          for (int x = rl; x < keys_per_tile; x += lanes)
            if (logits[rq][x] != INFMLLM_NEG_INF) sum += __expf(logits[rq][x] - m);
        for (int o = lanes / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (rq < n && rl == 0) {
          const int64_t at = (row * queries + first + rq) * tiles + tile;
          part_m[at] = m;
          part_s[at] = sum;
        }
      });
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

// Final score of key j from its summed probabilities: group mean, visible-count normalisation,
// carry.
__device__ __forceinline__ void store_column(float* out, int64_t row, int slots, int j, float acc, int group,
                                             int window, int q_start, int normalise, float decay) {
  float col = acc / (float)group;
  if (normalise) col /= fmaxf(1.f, (float)(window - max(0, j - q_start)));
  float* o = out + row * (int64_t)slots + j;
  *o = decay != 0.f ? decay * *o + col : col;
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
  for (int qq = threadIdx.x; qq < queries; qq += INFMLLM_THREADS) lse_s[qq] = lse[row * queries + qq];
  float kr[WS_PART];
  load_key_part(k, row, j, part, length, slots, head_dim, kr);
  float acc = 0.f;
  sweep_queries(q, qs, kr, layer, kv_head, q_heads, group, window, head_dim, part, parts,
      [&](int, int qq, int i, float dot) {
        if (j < length && j <= q_start + i) acc += __expf(dot * scale + beta * (float)j - lse_s[qq]);
      },
      [](int, int) {});
  if (part == 0 && j < length) store_column(out, row, slots, j, acc, group, window, q_start, normalise, decay);
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

// ---- Tensor-core path (fp16, head_dim 16..128, multiple of 16) ----
#define TC_KEYS 128            // keys per block: 8 warps x 16
#define TC_Q 16                // queries per chunk (MMA M)
#define TC_MAX_HEAD_DIM 128
#define TC_PAD 8               // halves of padding per staged row: conflict-free fragment loads
#define TC_LD (TC_KEYS + 4)    // logits row pitch (floats)

struct TcTile {
  __half k[TC_KEYS * (TC_MAX_HEAD_DIM + TC_PAD)];  // the block's keys, zero beyond length
  __half q[TC_Q * (TC_MAX_HEAD_DIM + TC_PAD)];     // one chunk of queries, zero beyond the row's
  float logits[TC_Q * TC_LD];                      // q . k of the chunk, [query][key]
};

// Copy rows of `head_dim` halves to shared memory (pitch head_dim + TC_PAD), 8 halves at a time;
// rows >= valid_rows are zero.
__device__ __forceinline__ void stage_rows(__half* dst, const __half* src, int rows, int head_dim, int valid_rows) {
  const int vecs = head_dim / 8;
  for (int x = threadIdx.x; x < rows * vecs; x += INFMLLM_THREADS) {
    const int r = x / vecs, c = (x % vecs) * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid_rows) v = *reinterpret_cast<const uint4*>(src + (int64_t)r * head_dim + c);
    *reinterpret_cast<uint4*>(dst + r * (head_dim + TC_PAD) + c) = v;
  }
}

__device__ __forceinline__ unsigned int half_pair(const __half* p) { return *reinterpret_cast<const unsigned int*>(p); }

// D = A (16x16, row-major) * B (16x8, col-major) + D, fp16 in, fp32 accumulate (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type").
__device__ __forceinline__ void mma_16816(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Logits of query chunk `first` against the staged keys, into sh.logits. Warp w owns keys
// 16w..16w+15 (two n8 blocks); lane = 4 * group + tid_in_group as in the PTX fragment layout.
__device__ void tc_logits(TcTile& sh, const __half* __restrict__ qrow, int head_dim, int queries, int first) {
  stage_rows(sh.q, qrow + (int64_t)first * head_dim, TC_Q, head_dim, queries - first);
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t2 = (lane & 3) * 2;
  const int pitch = head_dim + TC_PAD;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  for (int kk = 0; kk < head_dim; kk += 16) {
    const unsigned int a[4] = {half_pair(sh.q + g * pitch + kk + t2), half_pair(sh.q + (g + 8) * pitch + kk + t2),
                               half_pair(sh.q + g * pitch + kk + 8 + t2),
                               half_pair(sh.q + (g + 8) * pitch + kk + 8 + t2)};
    for (int nb = 0; nb < 2; ++nb) {
      const __half* key = sh.k + (warp * 16 + nb * 8 + g) * pitch + kk + t2;
      mma_16816(acc[nb], a, half_pair(key), half_pair(key + 8));
    }
  }
  for (int nb = 0; nb < 2; ++nb) {
    const int col = warp * 16 + nb * 8 + t2;
    sh.logits[g * TC_LD + col] = acc[nb][0];
    sh.logits[g * TC_LD + col + 1] = acc[nb][1];
    sh.logits[(g + 8) * TC_LD + col] = acc[nb][2];
    sh.logits[(g + 8) * TC_LD + col + 1] = acc[nb][3];
  }
  __syncthreads();
}

__device__ __forceinline__ void tc_stage_keys(TcTile& sh, const __half* __restrict__ k, int64_t row, int tile,
                                              int slots, int head_dim, int length) {
  const int first = tile * TC_KEYS;
  stage_rows(sh.k, k + (row * slots + first) * (int64_t)head_dim, TC_KEYS, head_dim, length - first);
}

extern "C" __global__ void __launch_bounds__(INFMLLM_THREADS)
window_partial_tc(const __half* __restrict__ q, const __half* __restrict__ k, float* part_m, float* part_s,
                  int kv_heads, int q_heads, int window, int slots, int head_dim, int length, int q_start,
                  float scale, float beta) {
  __shared__ __align__(16) TcTile sh;
  const int64_t row = blockIdx.x, layer = row / kv_heads;
  const int kv_head = row % kv_heads, tile = blockIdx.y, tiles = gridDim.y;
  const int group = q_heads / kv_heads, queries = group * window;
  const __half* qrow = q + (layer * q_heads + (int64_t)kv_head * group) * window * head_dim;
  const int m = threadIdx.x / 16, sub = threadIdx.x % 16;  // query of the chunk, lane among its 16
  tc_stage_keys(sh, k, row, tile, slots, head_dim, length);
  for (int first = 0; first < queries; first += TC_Q) {
    tc_logits(sh, qrow, head_dim, queries, first);
    const int i = (first + m) % window;
    float l[TC_KEYS / 16], mx = INFMLLM_NEG_INF, sum = 0.f;
    for (int x = 0; x < TC_KEYS / 16; ++x) {
      const int n = sub + 16 * x, j = tile * TC_KEYS + n;
      l[x] = (j < length && j <= q_start + i) ? sh.logits[m * TC_LD + n] * scale + beta * (float)j : INFMLLM_NEG_INF;
      mx = fmaxf(mx, l[x]);
    }
    for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (mx != INFMLLM_NEG_INF)
      for (int x = 0; x < TC_KEYS / 16; ++x)
        if (l[x] != INFMLLM_NEG_INF) sum += __expf(l[x] - mx);
    for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (sub == 0 && first + m < queries) {
      const int64_t at = (row * queries + first + m) * tiles + tile;
      part_m[at] = mx;
      part_s[at] = sum;
    }
    __syncthreads();  // logits and q are overwritten by the next chunk
  }
}

extern "C" __global__ void __launch_bounds__(INFMLLM_THREADS)
window_columns_tc(const __half* __restrict__ q, const __half* __restrict__ k, const float* __restrict__ lse,
                  float* out, int kv_heads, int q_heads, int window, int slots, int head_dim, int length,
                  int q_start, float scale, float beta, int normalise, float decay) {
  __shared__ __align__(16) TcTile sh;
  const int64_t row = blockIdx.x, layer = row / kv_heads;
  const int kv_head = row % kv_heads, tile = blockIdx.y;
  const int group = q_heads / kv_heads, queries = group * window;
  const __half* qrow = q + (layer * q_heads + (int64_t)kv_head * group) * window * head_dim;
  const int n = threadIdx.x / 2, half_q = threadIdx.x % 2;  // key of the tile; even or odd queries
  const int j = tile * TC_KEYS + n;
  tc_stage_keys(sh, k, row, tile, slots, head_dim, length);
  float acc = 0.f;
  for (int first = 0; first < queries; first += TC_Q) {
    tc_logits(sh, qrow, head_dim, queries, first);
    for (int m = half_q; m < TC_Q; m += 2) {
      const int qq = first + m;
      if (qq < queries && j < length && j <= q_start + qq % window)
        acc += __expf(sh.logits[m * TC_LD + n] * scale + beta * (float)j - lse[row * queries + qq]);
    }
    __syncthreads();
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  if (half_q == 0 && j < length) store_column(out, row, slots, j, acc, group, window, q_start, normalise, decay);
}
