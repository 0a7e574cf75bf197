// saddle_select: per (layer, kv_head) row keep sinks + the `recent` newest slots + the top-k
// scoring others, output ascending slot indices.
//
// Specification: infmllm_ros/kvcache/reference.py::saddle_select. A candidate j (slot in
// [sinks, length - recent)) is kept when its rank is < k, rank = #{candidates i : s_i > s_j or
// (s_i == s_j and i < j)}: exactly the order of torch.sort(descending=True, stable=True), so ties
// go to the lower slot and the result is deterministic. Scores must be finite (NaN ranks
// differently from torch.sort); -0.0 and +0.0 are equal, as in torch.
//
// One block per row, O(length) work per row: a 4-pass, 8-bit radix select finds the k-th largest
// score T and how many candidates equal to T are still needed (k_eq); a final pass over tiles of
// slots keeps s > T and the first k_eq candidates with s == T (a block scan ranks them by slot),
// and a second block scan of the keep flags gives each kept slot its output position, so the
// output is ascending without a sort.
#include "kvcache_layout.cuh"

// Order-preserving map of a finite float to uint32 (larger float -> larger key; -0 == +0).
__device__ __forceinline__ unsigned int order_key(float x) {
  const unsigned int u = __float_as_uint(x == 0.f ? 0.f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of `flag` over the block in thread order; *total gets the block's sum.
__device__ int block_exclusive_scan(int flag, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = flag;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int w = 0; w < INFMLLM_THREADS / 32; ++w) {
      const int s = warp_sums[w];
      warp_sums[w] = acc;
      acc += s;
    }
    *total = acc;
  }
  __syncthreads();
  const int result = warp_sums[warp] + x - flag;
  __syncthreads();
  return result;
}

extern "C" __global__ void __launch_bounds__(INFMLLM_THREADS)
saddle_select_f32(const float* __restrict__ scores, int64_t* __restrict__ keep, int length,
                  int score_stride, int sinks, int recent, int budget) {
  __shared__ int hist[256];
  __shared__ int warp_sums[INFMLLM_THREADS / 32];
  __shared__ int total;
  __shared__ unsigned int prefix_s;
  __shared__ int need_s;
  const int64_t row = blockIdx.x;
  const float* s = scores + row * (int64_t)score_stride;
  const int lo = sinks, hi = length - recent, k = budget - sinks - recent;
  const int lane = threadIdx.x & 31;

  // Radix select, most significant byte first: after the passes, prefix = key of the k-th
  // largest candidate and need = how many candidates equal to it are kept.
  if (threadIdx.x == 0) {
    prefix_s = 0u;
    need_s = k;
  }
  __syncthreads();
  for (int shift = 24; shift >= 0 && k > 0; shift -= 8) {
    const unsigned int prefix = prefix_s, high_mask = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
    hist[threadIdx.x] = 0;  // INFMLLM_THREADS == 256 bins
    __syncthreads();
    for (int base = lo; base < hi; base += INFMLLM_THREADS) {
      const int j = base + threadIdx.x;
      const unsigned int key = j < hi ? order_key(s[j]) : 0u;
      const int digit = (j < hi && (key & high_mask) == prefix) ? (key >> shift) & 0xff : 256;
      const unsigned int peers = __match_any_sync(0xffffffffu, digit);  // warp-aggregated atomics
      if (digit < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
    }
    __syncthreads();
    // Thread t looks at bin 255 - t: `greater` = candidates in higher bins. Exactly one bin holds
    // the need-th largest.
    const int bin = 255 - threadIdx.x, count = hist[bin], need = need_s;
    const int greater = block_exclusive_scan(count, warp_sums, &total);
    if (greater < need && need <= greater + count) {
      prefix_s = prefix | ((unsigned int)bin << shift);
      need_s = need - greater;
    }
    __syncthreads();
  }
  const unsigned int threshold = k > 0 ? prefix_s : 0xffffffffu;  // k == 0: no candidate is kept
  const int need = k > 0 ? need_s : 0;

  // Keep flags in slot order; ties at the threshold go to the lowest slots.
  int written = 0, equal_before = 0;
  for (int base = 0; base < length; base += INFMLLM_THREADS) {
    const int j = base + threadIdx.x;
    const bool candidate = j >= lo && j < hi;
    const unsigned int key = candidate ? order_key(s[j]) : 0u;
    const int equal = candidate && key == threshold;
    const int equal_rank = equal_before + block_exclusive_scan(equal, warp_sums, &total);
    equal_before += total;
    const int flag = j < length && (!candidate || key > threshold || (equal && equal_rank < need));
    const int pos = block_exclusive_scan(flag, warp_sums, &total);
    if (flag) keep[row * budget + written + pos] = j;
    written += total;
  }
}
