// kv_compact: move the kept slots of every (layer, kv_head) row to the front, re-rotating keys.
//
// Specification: infmllm_ros/kvcache/reference.py::kv_compact. For row r and output slot b,
// src = keep[r, b]; K[r, b] = rope_rotate(K[r, src], shift = b - src); V[r, b] = V[r, src];
// metadata[r, b] = metadata[r, src]. Rotation angles are shift * inv_freq[i] in fp32, with
// inv_freq passed from the host (the same fp32 table torch uses).
//
// Parallel over (row, tile of output slots), correct in place. A tile reads all its sources
// into registers before writing. keep is ascending with b <= keep[b] <= b + max_shift, so the
// only tiles that read a tile's destination slots are the ceil(max_shift / tile) tiles before
// it in the same row. Each tile publishes "sources read" in a flag and waits for those earlier
// tiles' flags before writing. Tiles are claimed in order from an atomic counter, so every
// tile waited on belongs to a block that is already running and whose reads wait on nothing:
// no deadlock, whatever the scheduler does. Out of place, no tile waits (wait_tiles = 0).
#include "kvcache_layout.cuh"

#define KVC_VEC 4    // elements per vector access (head_dim must be a multiple of 2 * KVC_VEC)
#define KVC_ITEMS 4  // vector pairs of K (and of V) each thread holds per tile

__device__ __forceinline__ void load4(const float* p, float* x) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
}
__device__ __forceinline__ void load4(const __half* p, float* x) {
  const uint2 a = *reinterpret_cast<const uint2*>(p);
  const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&a.x));
  const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&a.y));
  x[0] = lo.x; x[1] = lo.y; x[2] = hi.x; x[3] = hi.y;
}
__device__ __forceinline__ void store4(float* p, const float* x) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}
__device__ __forceinline__ void store4(__half* p, const float* x) {
  const __half2 lo = __floats2half2_rn(x[0], x[1]), hi = __floats2half2_rn(x[2], x[3]);
  uint2 a;
  a.x = *reinterpret_cast<const unsigned int*>(&lo);
  a.y = *reinterpret_cast<const unsigned int*>(&hi);
  *reinterpret_cast<uint2*>(p) = a;
}

// Output slots per tile for a head_dim, at most one per thread (the metadata is one slot per
// thread). Host mirror: kernels.compact_tile_slots.
__device__ __forceinline__ int compact_tile_slots(int head_dim) {
  return min(INFMLLM_THREADS, KVC_ITEMS * INFMLLM_THREADS * KVC_VEC / (head_dim / 2));
}

template <typename T>
__device__ void kv_compact_tiles(const T* k_src, const T* v_src, T* k_dst, T* v_dst,
                                 const int64_t* __restrict__ keep, const float* __restrict__ inv_freq,
                                 int64_t* position, int8_t* kind, int32_t* frame, double* stamp,
                                 float* scores, int* flags, int* counter, int kept, int slots,
                                 int head_dim, int rotate, int tiles, int wait_tiles) {
  __shared__ int claimed;
  if (threadIdx.x == 0) claimed = atomicAdd(counter, 1);
  __syncthreads();
  const int id = claimed;
  const int64_t row = id / tiles;
  const int tile = id % tiles;
  const int half = head_dim / 2, vecs = half / KVC_VEC, per_tile = compact_tile_slots(head_dim);
  const int b0 = tile * per_tile;

  // Read phase: K/V pairs (rotated) and this tile's metadata into registers.
  float k0[KVC_ITEMS][KVC_VEC], k1[KVC_ITEMS][KVC_VEC], v0[KVC_ITEMS][KVC_VEC], v1[KVC_ITEMS][KVC_VEC];
  for (int it = 0; it < KVC_ITEMS; ++it) {
    const int w = it * INFMLLM_THREADS + threadIdx.x, b = b0 + w / vecs, i = (w % vecs) * KVC_VEC;
    if (w / vecs >= per_tile || b >= kept) continue;
    const int64_t src = keep[row * kept + b];
    load4(k_src + kv_offset(row, src, i, slots, head_dim), k0[it]);
    load4(k_src + kv_offset(row, src, i + half, slots, head_dim), k1[it]);
    load4(v_src + kv_offset(row, src, i, slots, head_dim), v0[it]);
    load4(v_src + kv_offset(row, src, i + half, slots, head_dim), v1[it]);
    if (rotate && src != b) {
      for (int e = 0; e < KVC_VEC; ++e) {
        float s, c;
        sincosf((float)(b - src) * inv_freq[i + e], &s, &c);
        const float r0 = k0[it][e] * c - k1[it][e] * s, r1 = k1[it][e] * c + k0[it][e] * s;
        k0[it][e] = r0;
        k1[it][e] = r1;
      }
    }
  }
  const int mb = b0 + threadIdx.x;
  const bool meta = threadIdx.x < per_tile && mb < kept;
  int64_t m_pos = 0;
  int8_t m_kind = 0;
  int32_t m_frame = 0;
  double m_stamp = 0.0;
  float m_score = 0.f;
  if (meta) {
    const int64_t src = row * slots + keep[row * kept + mb];
    m_pos = position[src];
    m_kind = kind[src];
    m_frame = frame[src];
    m_stamp = stamp[src];
    if (scores) m_score = scores[src];
  }

  // Publish "read", then wait until no earlier tile still has to read our destination slots.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicExch(flags + id, 1);
    for (int back = 1; back <= wait_tiles && back <= tile; ++back)
      while (atomicAdd(flags + id - back, 0) == 0) {
      }
    __threadfence();
  }
  __syncthreads();

  // Write phase.
  for (int it = 0; it < KVC_ITEMS; ++it) {
    const int w = it * INFMLLM_THREADS + threadIdx.x, b = b0 + w / vecs, i = (w % vecs) * KVC_VEC;
    if (w / vecs >= per_tile || b >= kept) continue;
    store4(k_dst + kv_offset(row, b, i, slots, head_dim), k0[it]);
    store4(k_dst + kv_offset(row, b, i + half, slots, head_dim), k1[it]);
    store4(v_dst + kv_offset(row, b, i, slots, head_dim), v0[it]);
    store4(v_dst + kv_offset(row, b, i + half, slots, head_dim), v1[it]);
  }
  if (meta) {
    const int64_t dst = row * slots + mb;
    position[dst] = m_pos;
    kind[dst] = m_kind;
    frame[dst] = m_frame;
    stamp[dst] = m_stamp;
    if (scores) scores[dst] = m_score;
  }
}

#define INFMLLM_KV_COMPACT(NAME, T)                                                              \
  extern "C" __global__ void __launch_bounds__(INFMLLM_THREADS) NAME(                          \
      const T* k_src, const T* v_src, T* k_dst, T* v_dst, const int64_t* keep,                 \
      const float* inv_freq, int64_t* position, int8_t* kind, int32_t* frame, double* stamp,  \
      float* scores, int* flags, int* counter, int kept, int slots, int head_dim, int rotate,  \
      int tiles, int wait_tiles) {                                                             \
    kv_compact_tiles<T>(k_src, v_src, k_dst, v_dst, keep, inv_freq, position, kind, frame,    \
                        stamp, scores, flags, counter, kept, slots, head_dim, rotate, tiles,   \
                        wait_tiles);                                                           \
  }

INFMLLM_KV_COMPACT(kv_compact_f32, float)
INFMLLM_KV_COMPACT(kv_compact_f16, __half)
