// Fused group normalisation (+ optional SiLU) over contiguous NCHW tensors: statistics in f32
// with Welford's update and Chan's merge, input and output in f32, f16 or bf16.
//
// Three launches: partial statistics over chunks of each (batch, group) run, so a large image
// still fills the GPU (a VAE group at 512² is a million elements); a merge per group; one pass that
// normalises, applies the per-channel scale and shift, and SiLU. Compiled to PTX by build.rs.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

struct Stats {
  float n;
  float mean;
  float m2;
};

// Chan et al.'s parallel merge of two partial (count, mean, sum of squared deviations).
__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean;
  const float fb = b.n / n;
  Stats r;
  r.n = n;
  r.mean = a.mean + d * fb;
  r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
  return r;
}

__device__ __forceinline__ Stats warp_merge(Stats s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o;
    o.n = __shfl_xor_sync(0xffffffff, s.n, off);
    o.mean = __shfl_xor_sync(0xffffffff, s.mean, off);
    o.m2 = __shfl_xor_sync(0xffffffff, s.m2, off);
    s = merge(s, o);
  }
  return s;
}

// grid (groups_total, chunks); block 256 (a multiple of 32, at most 1024).
// part[(g * chunks + c) * 3 + {0,1,2}] = (n, mean, m2) of chunk c of run g.
template <typename T>
__device__ void gn_partial(const T *x, float *part, const uint64_t group_size, const uint64_t chunk) {
  const uint64_t g = blockIdx.x;
  const uint64_t c = blockIdx.y;
  const uint64_t start = c * chunk;
  const uint64_t stop = min(start + chunk, group_size);
  const T *base = x + g * group_size;
  Stats s = {0.f, 0.f, 0.f};
  for (uint64_t i = start + threadIdx.x; i < stop; i += blockDim.x) {
    const float v = to_f(base[i]);
    s.n += 1.f;
    const float d = v - s.mean;
    s.mean += d / s.n;
    s.m2 += d * (v - s.mean);
  }
  s = warp_merge(s);
  __shared__ Stats shared[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    Stats t = lane < warps ? shared[lane] : Stats{0.f, 0.f, 0.f};
    t = warp_merge(t);
    if (lane == 0) {
      float *p = part + (g * gridDim.y + c) * 3;
      p[0] = t.n;
      p[1] = t.mean;
      p[2] = t.m2;
    }
  }
}

// One thread per run: merge its chunks into stats[2g] = mean, stats[2g+1] = 1/sqrt(var + eps)
// (the biased variance, as torch's group_norm).
extern "C" __global__ void gn_finalize(const float *part, float *stats, const uint32_t groups_total,
                                       const uint32_t chunks, const float eps) {
  const uint32_t g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups_total) return;
  Stats s = {0.f, 0.f, 0.f};
  for (uint32_t c = 0; c < chunks; ++c) {
    const float *p = part + ((uint64_t)g * chunks + c) * 3;
    s = merge(s, Stats{p[0], p[1], p[2]});
  }
  const float var = s.n > 0.f ? s.m2 / s.n : 0.f;
  stats[2 * g] = s.mean;
  stats[2 * g + 1] = rsqrtf(fmaxf(var, 0.f) + eps);
}

// y = (x - mean) * rstd * weight[ch] + bias[ch], then SiLU when asked; grid-stride over elements.
template <typename T>
__device__ void gn_apply(const T *x, T *y, const float *stats, const T *weight, const T *bias,
                         const uint64_t numel, const uint64_t group_size, const uint64_t spatial,
                         const uint64_t channels, const uint32_t silu) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < numel;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t g = i / group_size;
    const uint64_t ch = (i / spatial) % channels;
    float v = (to_f(x[i]) - stats[2 * g]) * stats[2 * g + 1];
    v = v * to_f(weight[ch]) + to_f(bias[ch]);
    if (silu) v = v / (1.f + expf(-v));
    y[i] = from_f<T>(v);
  }
}

#define GROUP_NORM_OPS(TYPENAME, SUFFIX)                                                           \
  extern "C" __global__ void gn_partial_##SUFFIX(const TYPENAME *x, float *part,                   \
                                                 const uint64_t group_size, const uint64_t chunk) { \
    gn_partial<TYPENAME>(x, part, group_size, chunk);                                              \
  }                                                                                                \
  extern "C" __global__ void gn_apply_##SUFFIX(                                                    \
      const TYPENAME *x, TYPENAME *y, const float *stats, const TYPENAME *weight,                  \
      const TYPENAME *bias, const uint64_t numel, const uint64_t group_size,                       \
      const uint64_t spatial, const uint64_t channels, const uint32_t silu) {                      \
    gn_apply<TYPENAME>(x, y, stats, weight, bias, numel, group_size, spatial, channels, silu);     \
  }

GROUP_NORM_OPS(float, f32)
GROUP_NORM_OPS(__half, f16)
GROUP_NORM_OPS(__nv_bfloat16, bf16)
