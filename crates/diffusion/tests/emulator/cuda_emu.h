// Runs our CUDA kernels (src/kernels/*.cu) on the CPU, so their indexing, padding, reductions and
// tile logic are tested on a machine without a GPU. One OS thread per CUDA thread, blocks one after
// another; __syncthreads and __syncwarp are barriers, warp shuffles go through a per-warp buffer;
// WMMA fragments follow the documented row-/column-major semantics (an accumulator's elements are
// split among the lanes, as on the hardware, so a lane touches only its own). What this cannot
// test is the GPU itself (timing, the hardware's fragment layout, memory ordering beyond the
// barriers): the GPU test (tests/cuda_kernels.rs) and kernels::verified do.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// Static shared memory: one copy, shared by the threads of the block running now.
#define __shared__ static

// ---- f16 / bf16 ----
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float emu_to_float(float x) { return x; }
inline float emu_to_float(__half x) { return __half2float(x); }
inline float emu_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// ---- math and vector types ----
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }


template <typename A, typename B> inline auto min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B> inline auto max(A a, B b) { return a < b ? b : a; }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- the block being run ----
struct EmuBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;  // [warp][32]
  std::vector<unsigned char> dynamic_smem;
};
inline EmuBlock emu_block;

inline int emu_lane() { return (int)(threadIdx.x % 32); }
inline int emu_warp() { return (int)(threadIdx.x / 32); }

inline void __syncthreads() { emu_block.block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block.warps[emu_warp()]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  float *buf = emu_block.shuffle.data() + emu_warp() * 32;
  buf[emu_lane()] = v;
  __syncwarp();
  const float r = buf[emu_lane() ^ offset];
  __syncwarp();
  return r;
}

#define DYNAMIC_SHARED(name) unsigned char *name = emu_block.dynamic_smem.data()

// Runs `kernel` (a call of one __global__ function) over the grid. blockDim.x a multiple of 32.
// The block's threads are made once and run the blocks in turn, with a barrier between blocks
// (shared memory is reused, as when a block finishes and the next starts on the same SM).
inline void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &kernel) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  const unsigned warps = (threads + 31) / 32;
  emu_block.block = std::make_unique<std::barrier<>>(threads);
  emu_block.warps.clear();
  for (unsigned w = 0; w < warps; ++w)
    emu_block.warps.push_back(std::make_unique<std::barrier<>>(32));
  emu_block.shuffle.assign(warps * 32, 0.f);
  // Garbage, not zeros, so a kernel that reads what it never wrote shows it.
  emu_block.dynamic_smem.assign(smem + 64, 0xA5);
  std::barrier<> between(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3{x, y, z};
            kernel();
            between.arrive_and_wait();
          }
    });
  for (auto &th : pool) th.join();
}
