// kv_compact: move the kept slots of every (layer, kv_head) row to the front, re-rotating keys.
//
// Specification: infmllm_ros/kvcache/reference.py::kv_compact. For row r and output slot b,
// src = keep[r, b]; K[r, b] = rope_rotate(K[r, src], shift = b - src); V[r, b] = V[r, src];
// metadata[r, b] = metadata[r, src]. Rotation angles are shift * inv_freq[i] in fp32, with
// inv_freq passed from the host (the same fp32 table torch uses).
//
// One block per row. The row is processed in tiles of consecutive output slots; a tile first
// reads all its sources into registers, synchronises, then writes. Because keep is ascending
// and keep[b] >= b, a tile's sources are never earlier tiles' destinations, so the kernel is
// correct in place (dst == src) as well as out of place.
#include "kvcache_layout.cuh"

template <typename T>
__device__ void kv_compact_row(const T* __restrict__ k_src, const T* __restrict__ v_src,
                               T* k_dst, T* v_dst, const int64_t* __restrict__ keep,
                               const float* __restrict__ inv_freq, int64_t row, int kept,
                               int slots, int head_dim, int rotate) {
  const int half = head_dim / 2;
  const int per_tile = INFMLLM_THREADS / half;  // output slots per tile
  const int t = threadIdx.x;
  const int local = t / half, i = t % half;
  const bool active = local < per_tile;
  for (int base = 0; base < kept; base += per_tile) {
    const int b = base + local;
    const bool ok = active && b < kept;
    float k0 = 0.f, k1 = 0.f, v0 = 0.f, v1 = 0.f;
    if (ok) {
      const int64_t src = keep[row * kept + b];
      k0 = to_float(k_src[kv_offset(row, src, i, slots, head_dim)]);
      k1 = to_float(k_src[kv_offset(row, src, i + half, slots, head_dim)]);
      v0 = to_float(v_src[kv_offset(row, src, i, slots, head_dim)]);
      v1 = to_float(v_src[kv_offset(row, src, i + half, slots, head_dim)]);
      if (rotate) {
        const float angle = (float)(b - src) * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        const float r0 = k0 * c - k1 * s, r1 = k1 * c + k0 * s;
        k0 = r0;
        k1 = r1;
      }
    }
    __syncthreads();
    if (ok) {
      k_dst[kv_offset(row, b, i, slots, head_dim)] = from_float<T>(k0);
      k_dst[kv_offset(row, b, i + half, slots, head_dim)] = from_float<T>(k1);
      v_dst[kv_offset(row, b, i, slots, head_dim)] = from_float<T>(v0);
      v_dst[kv_offset(row, b, i + half, slots, head_dim)] = from_float<T>(v1);
    }
    __syncthreads();
  }
}

// Per-slot metadata of one row, same tiling (sources read before any write of the tile).
template <typename M>
__device__ void gather_row(M* meta, const int64_t* __restrict__ keep, int64_t row, int kept, int slots) {
  for (int base = 0; base < kept; base += INFMLLM_THREADS) {
    const int b = base + threadIdx.x;
    M value{};
    if (b < kept) value = meta[row * (int64_t)slots + keep[row * kept + b]];
    __syncthreads();
    if (b < kept) meta[row * (int64_t)slots + b] = value;
    __syncthreads();
  }
}

#define INFMLLM_KV_COMPACT(NAME, T)                                                              \
  extern "C" __global__ void __launch_bounds__(INFMLLM_THREADS) NAME(                          \
      const T* k_src, const T* v_src, T* k_dst, T* v_dst, const int64_t* keep,                 \
      const float* inv_freq, int64_t* position, int8_t* kind, int32_t* frame, double* stamp,  \
      float* scores, int kept, int slots, int head_dim, int rotate) {                          \
    const int64_t row = blockIdx.x;                                                            \
    kv_compact_row<T>(k_src, v_src, k_dst, v_dst, keep, inv_freq, row, kept, slots, head_dim, \
                      rotate);                                                                 \
    gather_row<int64_t>(position, keep, row, kept, slots);                                     \
    gather_row<int8_t>(kind, keep, row, kept, slots);                                          \
    gather_row<int32_t>(frame, keep, row, kept, slots);                                        \
    gather_row<double>(stamp, keep, row, kept, slots);                                         \
    if (scores) gather_row<float>(scores, keep, row, kept, slots);                             \
  }

INFMLLM_KV_COMPACT(kv_compact_f32, float)
INFMLLM_KV_COMPACT(kv_compact_f16, __half)
