// WMMA (16×16×16) for the CPU emulator: matrix_a/matrix_b fragments hold the whole tile (they are
// only read); an accumulator's 256 elements belong to the lanes as element % 32 == lane, and a lane
// loads, computes and stores only its own, as each lane holds part of the tile on a GPU.
#pragma once
#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  float x[M * N];
};

inline bool owned(int e) { return e % 32 == emu_lane(); }

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L> &f, float v) {
  for (int e = 0; e < 256; ++e) f.x[e] = v;
}

template <typename Use, typename T>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major> &f, const T *p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = emu_to_float(p[r * ldm + c]);
}

template <typename Use, typename T>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, col_major> &f, const T *p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = emu_to_float(p[c * ldm + r]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p,
                             unsigned ldm, layout_t layout) {
  for (int e = 0; e < 256; ++e)
    if (owned(e)) {
      const int r = e / 16, c = e % 16;
      f.x[e] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
    }
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f,
                              unsigned ldm, layout_t layout) {
  for (int e = 0; e < 256; ++e)
    if (owned(e)) {
      const int r = e / 16, c = e % 16;
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
    }
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
                     const fragment<matrix_a, 16, 16, 16, T, LA> &a,
                     const fragment<matrix_b, 16, 16, 16, T, LB> &b,
                     const fragment<accumulator, 16, 16, 16, float> &c) {
  for (int e = 0; e < 256; ++e)
    if (owned(e)) {
      const int i = e / 16, j = e % 16;
      float s = c.x[e];
      for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      d.x[e] = s;
    }
}
}  // namespace wmma
}  // namespace nvcuda
