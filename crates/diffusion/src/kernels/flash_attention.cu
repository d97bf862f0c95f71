// Flash attention, forward only (inference): softmax(q·kᵀ·scale)·v without the score matrix in
// device memory, as FlashAttention-2 computes it. f16 or bf16 in and out; q·kᵀ and p·v on tensor
// cores (WMMA 16×16×16) accumulating in f32; the running softmax (row max, row sum, rescale) in
// f32.
//
// Layout: q [B, N, H·d], k and v [B, M, H·d], out [B, N, H·d], contiguous — the projections'
// own layout, so heads need no transposed copies. One block of 4 warps per (64 query rows, head,
// batch); each warp owns 16 rows. Keys and values stream through shared memory 64 at a time.
// The head dimension is padded with zeros to DP (a multiple of 16) in shared memory.
// Compiled to PTX by build.rs (sm_80+: bf16 WMMA).

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;

// The block's dynamic shared memory (tests/emulator runs this file on the CPU with its own).
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(name) extern __shared__ __align__(32) unsigned char name[]
#endif

constexpr int BR = 64;  // query rows per block
constexpr int BC = 64;  // keys per step
constexpr int WARPS = 4;

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// rows × d elements of a [*, stride] matrix starting at `src` into a [rows_max, DP] tile; rows
// past `rows` and columns past d are zero. d is a multiple of 8: 16-byte loads.
template <typename T, int DP>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int rows, int d, long stride) {
  const int chunks = DP / 8;  // 8 elements of 2 bytes = 16 bytes
  for (int i = threadIdx.x; i < BR * chunks; i += blockDim.x) {
    const int r = i / chunks;
    const int c = (i % chunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows && c < d) val = *reinterpret_cast<const uint4*>(src + r * stride + c);
    *reinterpret_cast<uint4*>(tile + r * DP + c) = val;
  }
}

template <typename T, int DP>
__device__ void flash_attention(const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, T* __restrict__ out, int n, int m,
                                int heads, int d, float scale) {
  DYNAMIC_SHARED(smem);
  T* qs = reinterpret_cast<T*>(smem);                 // [BR][DP]
  T* ks = qs + BR * DP;                               // [BC][DP]
  T* vs = ks + BC * DP;                               // [BC][DP]
  T* ps = vs + BC * DP;                               // [BR][BC]
  float* ss = reinterpret_cast<float*>(ps + BR * BC);  // [BR][BC]
  float* os = ss + BR * BC;                           // [BR][DP]
  float* row_max = os + BR * DP;                      // [BR]
  float* row_sum = row_max + BR;                      // [BR]
  float* row_alpha = row_sum + BR;                    // [BR]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int q0 = blockIdx.x * BR;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const long stride = (long)heads * d;
  const T* qb = q + ((long)b * n + q0) * stride + (long)h * d;
  const T* kb = k + (long)b * m * stride + (long)h * d;
  const T* vb = v + (long)b * m * stride + (long)h * d;

  load_tile<T, DP>(qs, qb, min(BR, n - q0), d, stride);
  for (int i = threadIdx.x; i < BR * DP; i += blockDim.x) os[i] = 0.f;
  for (int i = threadIdx.x; i < BR; i += blockDim.x) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }

  const int r0 = warp * 16;  // this warp's rows
  for (int kv0 = 0; kv0 < m; kv0 += BC) {
    __syncthreads();  // every warp is done with the previous keys and values
    const int kv_rows = min(BC, m - kv0);
    load_tile<T, DP>(ks, kb + (long)kv0 * stride, kv_rows, d, stride);
    load_tile<T, DP>(vs, vb + (long)kv0 * stride, kv_rows, d, stride);
    __syncthreads();

    // s = q·kᵀ for this warp's 16 rows × 64 keys.
    for (int j = 0; j < BC / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < DP / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, qs + r0 * DP + kk * 16, DP);
        wmma::load_matrix_sync(bt, ks + (j * 16) * DP + kk * 16, DP);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(ss + r0 * BC + j * 16, acc, BC, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax, one row at a time across the warp (two keys per lane).
    for (int r = r0; r < r0 + 16; ++r) {
      const int c0 = lane, c1 = lane + 32;
      const float s0 = c0 < kv_rows ? ss[r * BC + c0] * scale : -INFINITY;
      const float s1 = c1 < kv_rows ? ss[r * BC + c1] * scale : -INFINITY;
      const float old_max = row_max[r];
      const float new_max = fmaxf(old_max, warp_max(fmaxf(s0, s1)));
      const float p0 = __expf(s0 - new_max);
      const float p1 = __expf(s1 - new_max);
      const float sum = warp_sum(p0 + p1);
      ps[r * BC + c0] = from_f<T>(p0);
      ps[r * BC + c1] = from_f<T>(p1);
      __syncwarp();
      if (lane == 0) {
        const float alpha = __expf(old_max - new_max);  // 0 on the first step (old = -inf)
        row_alpha[r] = alpha;
        row_sum[r] = row_sum[r] * alpha + sum;
        row_max[r] = new_max;
      }
      __syncwarp();
    }

    // o = o·alpha + p·v for this warp's rows.
    for (int i = lane; i < 16 * DP; i += 32) {
      const int r = r0 + i / DP;
      os[r * DP + i % DP] *= row_alpha[r];
    }
    __syncwarp();
    for (int j = 0; j < DP / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, os + r0 * DP + j * 16, DP, wmma::mem_row_major);
      for (int kk = 0; kk < BC / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, ps + r0 * BC + kk * 16, BC);
        wmma::load_matrix_sync(bv, vs + (kk * 16) * DP + j * 16, DP);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(os + r0 * DP + j * 16, acc, DP, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // out = o / row sum, this warp's rows that exist.
  T* ob = out + ((long)b * n + q0) * stride + (long)h * d;
  for (int i = lane; i < 16 * d; i += 32) {
    const int r = r0 + i / d;
    const int c = i % d;
    if (q0 + r < n) ob[(long)r * stride + c] = from_f<T>(os[r * DP + c] / row_sum[r]);
  }
}

// Shared memory a launch needs for head dimension padded to DP.
#define SMEM_BYTES(DP) \
  ((BR * DP + 2 * BC * DP + BR * BC) * 2 + (BR * BC + BR * DP + 3 * BR) * 4)

#define FA(TYPENAME, T, DP)                                                                    \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                    \
      flash_attention_##TYPENAME##_##DP(const T* q, const T* k, const T* v, T* out, int n,    \
                                        int m, int heads, int d, float scale) {               \
    flash_attention<T, DP>(q, k, v, out, n, m, heads, d, scale);                               \
  }

// Head dimensions of SD 1.x (40, 80, 160), SD 2.x and SDXL (64), and others up to 160.
FA(f16, __half, 48)
FA(f16, __half, 64)
FA(f16, __half, 80)
FA(f16, __half, 96)
FA(f16, __half, 128)
FA(f16, __half, 160)
FA(bf16, __nv_bfloat16, 48)
FA(bf16, __nv_bfloat16, 64)
FA(bf16, __nv_bfloat16, 80)
FA(bf16, __nv_bfloat16, 96)
FA(bf16, __nv_bfloat16, 128)
FA(bf16, __nv_bfloat16, 160)
