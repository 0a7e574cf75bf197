// saddle_select: per (layer, kv_head) row keep sinks + the `recent` newest slots + the top-k
// scoring others, output ascending slot indices.
//
// Specification: infmllm_ros/kvcache/reference.py::saddle_select. A candidate j (slot in
// [sinks, length - recent)) is kept when its rank is < k, rank = #{candidates i : s_i > s_j or
// (s_i == s_j and i < j)}: exactly the order of torch.sort(descending=True, stable=True), so ties
// go to the lower slot and the result is deterministic. Scores must be finite (NaN ranks
// differently from torch.sort).
//
// One block per row. Candidates are ranked by comparing against tiles of scores staged in shared
// memory (O(length^2 / threads) per thread: fine to 4K slots, ~16x that at 16K; a radix select is
// the next step there). Output positions come from a block-wide exclusive scan of keep flags over
// consecutive tiles of slots, so the output is ascending without a sort.
#include "kvcache_layout.cuh"

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
  __shared__ float tile[INFMLLM_THREADS];
  __shared__ int warp_sums[INFMLLM_THREADS / 32];
  __shared__ int tile_total;
  const int64_t row = blockIdx.x;
  const float* s = scores + row * (int64_t)score_stride;
  const int lo = sinks, hi = length - recent, k = budget - sinks - recent;
  int written = 0;
  for (int base = 0; base < length; base += INFMLLM_THREADS) {
    const int j = base + threadIdx.x;
    const bool candidate = j >= lo && j < hi;
    const float sj = candidate ? s[j] : 0.f;
    int rank = 0;
    // Every thread joins the tile loop (it synchronises); only candidates count.
    for (int ib = lo; ib < hi; ib += INFMLLM_THREADS) {
      const int i = ib + threadIdx.x;
      tile[threadIdx.x] = i < hi ? s[i] : 0.f;
      __syncthreads();
      const int n = min(INFMLLM_THREADS, hi - ib);
      if (candidate) {
        for (int q = 0; q < n; ++q) {
          const float si = tile[q];
          rank += (si > sj) || (si == sj && ib + q < j);
        }
      }
      __syncthreads();
    }
    const int flag = (j < length) && (j < lo || j >= hi || rank < k);
    const int pos = block_exclusive_scan(flag, warp_sums, &tile_total);
    if (flag) keep[row * budget + written + pos] = j;
    written += tile_total;
  }
}
