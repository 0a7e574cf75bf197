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
// Sources are read with __ldcg (L2, not the SM's L1) and flags are st.release / ld.acquire.
#include "kvcache_layout.cuh"

#define KVC_ITEMS 4  // 16-byte vectors of K (and of V) per half-head each thread holds per tile

// 16 bytes of K or V: 4 fp32 or 8 fp16 elements. V moves as raw bits; K is unpacked to fp32 only
// when it must be rotated.
template <typename T> struct Vec { static constexpr int n = 16 / sizeof(T); };
__device__ __forceinline__ void unpack(const uint4& v, float* x, float) {
  x[0] = __uint_as_float(v.x); x[1] = __uint_as_float(v.y); x[2] = __uint_as_float(v.z); x[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ uint4 pack(const float* x, float) {
  return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
}
__device__ __forceinline__ float2 unpack_word(unsigned int w) {
  return make_float2(__half2float(__ushort_as_half((unsigned short)(w & 0xffffu))),
                     __half2float(__ushort_as_half((unsigned short)(w >> 16))));
}
__device__ __forceinline__ unsigned int pack_word(float a, float b) {
  return (unsigned int)__half_as_ushort(__float2half_rn(a)) | ((unsigned int)__half_as_ushort(__float2half_rn(b)) << 16);
}
__device__ __forceinline__ void unpack(const uint4& v, float* x, __half) {
  float2 f = unpack_word(v.x); x[0] = f.x; x[1] = f.y;
  f = unpack_word(v.y); x[2] = f.x; x[3] = f.y;
  f = unpack_word(v.z); x[4] = f.x; x[5] = f.y;
  f = unpack_word(v.w); x[6] = f.x; x[7] = f.y;
}
__device__ __forceinline__ uint4 pack(const float* x, __half) {
  return make_uint4(pack_word(x[0], x[1]), pack_word(x[2], x[3]), pack_word(x[4], x[5]), pack_word(x[6], x[7]));
}

// Rotate the pair of vectors (dims i..i+n-1 and i+half..) of a key moved by `shift` slots.
template <typename T>
__device__ __forceinline__ void rotate_pair(uint4& lo, uint4& hi, int shift, const float* __restrict__ inv_freq, int i) {
  constexpr int n = Vec<T>::n;
  float a[n], b[n];
  unpack(lo, a, T());
  unpack(hi, b, T());
  for (int e = 0; e < n; ++e) {
    float s, c;
    sincosf((float)shift * inv_freq[i + e], &s, &c);
    const float r0 = a[e] * c - b[e] * s, r1 = b[e] * c + a[e] * s;
    a[e] = r0;
    b[e] = r1;
  }
  lo = pack(a, T());
  hi = pack(b, T());
}

// Tile flags with explicit release / acquire semantics at GPU scope (PTX ISA memory model).
__device__ __forceinline__ void flag_release(int* flag) {
  asm volatile("st.release.gpu.global.s32 [%0], 1;" ::"l"(flag) : "memory");
}
__device__ __forceinline__ int flag_acquire(const int* flag) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
  return v;
}

// Output slots per tile for a head_dim, at most one per thread (the metadata is one slot per
// thread). Host mirror: kernels.compact_tile_slots.
template <typename T>
__device__ __forceinline__ int compact_tile_slots(int head_dim) {
  return min(INFMLLM_THREADS, KVC_ITEMS * INFMLLM_THREADS * Vec<T>::n / (head_dim / 2));
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
  const int half = head_dim / 2, vecs = half / Vec<T>::n, per_tile = compact_tile_slots<T>(head_dim);
  const int b0 = tile * per_tile;

  // Read phase: K/V vector pairs (K rotated) and this tile's metadata into registers.
  uint4 k0[KVC_ITEMS], k1[KVC_ITEMS], v0[KVC_ITEMS], v1[KVC_ITEMS];
#pragma unroll  // k0..v1 must stay in registers
  for (int it = 0; it < KVC_ITEMS; ++it) {
    const int w = it * INFMLLM_THREADS + threadIdx.x, b = b0 + w / vecs, i = (w % vecs) * Vec<T>::n;
    if (w / vecs >= per_tile || b >= kept) continue;
    const int64_t src = keep[row * kept + b];
    k0[it] = __ldcg(reinterpret_cast<const uint4*>(k_src + kv_offset(row, src, i, slots, head_dim)));
    k1[it] = __ldcg(reinterpret_cast<const uint4*>(k_src + kv_offset(row, src, i + half, slots, head_dim)));
    v0[it] = __ldcg(reinterpret_cast<const uint4*>(v_src + kv_offset(row, src, i, slots, head_dim)));
    v1[it] = __ldcg(reinterpret_cast<const uint4*>(v_src + kv_offset(row, src, i + half, slots, head_dim)));
    if (rotate && src != b) rotate_pair<T>(k0[it], k1[it], (int)(b - src), inv_freq, i);
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
    m_pos = __ldcg(position + src);
    m_kind = __ldcg(kind + src);
    m_frame = __ldcg(frame + src);
    m_stamp = __ldcg(stamp + src);
    if (scores) m_score = __ldcg(scores + src);
  }

  // Publish "read", then wait until no earlier tile still has to read our destination slots.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    flag_release(flags + id);
    for (int back = 1; back <= wait_tiles && back <= tile; ++back)
      while (flag_acquire(flags + id - back) == 0) {
      }
    __threadfence();
  }
  __syncthreads();

  // Write phase.
#pragma unroll  // k0..v1 must stay in registers
  for (int it = 0; it < KVC_ITEMS; ++it) {
    const int w = it * INFMLLM_THREADS + threadIdx.x, b = b0 + w / vecs, i = (w % vecs) * Vec<T>::n;
    if (w / vecs >= per_tile || b >= kept) continue;
    *reinterpret_cast<uint4*>(k_dst + kv_offset(row, b, i, slots, head_dim)) = k0[it];
    *reinterpret_cast<uint4*>(k_dst + kv_offset(row, b, i + half, slots, head_dim)) = k1[it];
    *reinterpret_cast<uint4*>(v_dst + kv_offset(row, b, i, slots, head_dim)) = v0[it];
    *reinterpret_cast<uint4*>(v_dst + kv_offset(row, b, i + half, slots, head_dim)) = v1[it];
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
