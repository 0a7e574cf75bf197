// Shared layout constants and indexing for the KV-cache kernels.
//
// Buffer layout everywhere: [layers, kv_heads, slots, head_dim], row-major, contiguous.
// A "row" is one (layer, kv_head) pair: `slots * head_dim` elements of K (or V), and
// `slots` elements of each per-slot metadata array. Keys use the rotate-half RoPE layout:
// dimension i is paired with i + head_dim / 2 (infmllm_ros/kvcache/rope.py).
#pragma once
#include <cuda_fp16.h>
#ifdef __CUDACC_RTC__
// NVRTC ships no C library headers: the fixed-width types the kernels use, spelled out.
typedef long long int64_t;
typedef int int32_t;
typedef signed char int8_t;
#else
#include <stdint.h>
#endif

#define INFMLLM_THREADS 256      // threads per block for every kernel in this folder
#define INFMLLM_MAX_HEAD_DIM 256 // largest head_dim supported
#define INFMLLM_NEG_INF __int_as_float(0xff800000)  // -inf (NVRTC has no math.h INFINITY)

// Element offset of (row, slot, dim) in a [rows, slots, head_dim] buffer.
__device__ __forceinline__ int64_t kv_offset(int64_t row, int64_t slot, int64_t dim,
                                             int64_t slots, int64_t head_dim) {
  return (row * slots + slot) * head_dim + dim;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
