// flash_attention.cu on the CPU emulator against softmax(q·kᵀ/√d)·v in f64 over the same rounded
// inputs: head dimensions padded to every compiled width, key and query counts that leave partial
// blocks, several heads and batches. Exit status 1 on any failure.
#include "../../src/kernels/flash_attention.cu"
#include "report.h"

template <typename T>
using Kernel = void (*)(const T *, const T *, const T *, T *, int, int, int, int, float);

template <typename T> Kernel<T> kernel_for(int dp);
#define PICK(TYPENAME, T)                                  \
  template <> Kernel<T> kernel_for<T>(int dp) {             \
    switch (dp) {                                           \
      case 48: return flash_attention_##TYPENAME##_48;      \
      case 64: return flash_attention_##TYPENAME##_64;      \
      case 80: return flash_attention_##TYPENAME##_80;      \
      case 96: return flash_attention_##TYPENAME##_96;      \
      case 128: return flash_attention_##TYPENAME##_128;    \
      case 160: return flash_attention_##TYPENAME##_160;    \
    }                                                       \
    return nullptr;                                         \
  }
PICK(f16, __half)
PICK(bf16, __nv_bfloat16)

// The padded width kernels::cuda::flash_dim picks.
int flash_dim(int d) {
  for (int p : {48, 64, 80, 96, 128, 160})
    if (p >= d) return p;
  return 0;
}

template <typename T>
void run(const char *dtype, double tol, int b, int n, int m, int heads, int d, unsigned seed) {
  const int c = heads * d, dp = flash_dim(d);
  auto cvt = [](const std::vector<float> &v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = from_f<T>(v[i]);
    return out;
  };
  const auto q = cvt(emu_randn((size_t)b * n * c, 0, 1.5f, seed));
  const auto k = cvt(emu_randn((size_t)b * m * c, 0, 1.5f, seed + 1));
  const auto v = cvt(emu_randn((size_t)b * m * c, 0, 1.0f, seed + 2));
  const double scale = 1.0 / std::sqrt((double)d);
  std::vector<double> want((size_t)b * n * c);
  std::vector<double> p(m);
  for (int bi = 0; bi < b; ++bi)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < n; ++i) {
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < m; ++j) {
          double s = 0;
          for (int e = 0; e < d; ++e)
            s += (double)emu_to_float(q[((size_t)bi * n + i) * c + h * d + e]) *
                 emu_to_float(k[((size_t)bi * m + j) * c + h * d + e]);
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        for (int j = 0; j < m; ++j) sum += (p[j] = std::exp(p[j] - mx));
        for (int e = 0; e < d; ++e) {
          double o = 0;
          for (int j = 0; j < m; ++j) o += p[j] * emu_to_float(v[((size_t)bi * m + j) * c + h * d + e]);
          want[((size_t)bi * n + i) * c + h * d + e] = o / sum;
        }
      }
  std::vector<T> out((size_t)b * n * c, from_f<T>(NAN));
  const size_t smem = (BR * dp + 2 * BC * dp + BR * BC) * 2 + (BR * BC + BR * dp + 3 * BR) * 4;
  const Kernel<T> kern = kernel_for<T>(dp);
  emu_launch(dim3{(unsigned)((n + BR - 1) / BR), (unsigned)heads, (unsigned)b}, dim3{WARPS * 32},
             smem, [&] {
               kern(q.data(), k.data(), v.data(), out.data(), n, m, heads, d, (float)scale);
             });
  char shape[96];
  std::snprintf(shape, sizeof shape, "b%d n%d m%d h%d d%d(padded %d)", b, n, m, heads, d, dp);
  emu_report("flash_attention", shape, dtype, emu_max_diff(out, want), tol);
}

int main() {
  // (batch, queries, keys, heads, head dim)
  const int cases[][5] = {{2, 100, 77, 2, 40}, {1, 70, 130, 2, 64}, {1, 64, 64, 1, 160},
                          {1, 129, 200, 3, 80}, {2, 33, 5, 2, 24},  {1, 65, 64, 1, 128},
                          {1, 40, 90, 2, 96}};
  unsigned seed = 1;
  for (const auto &cs : cases) {
    run<__half>("F16", 2e-2, cs[0], cs[1], cs[2], cs[3], cs[4], seed += 10);
    run<__nv_bfloat16>("BF16", 1.5e-1, cs[0], cs[1], cs[2], cs[3], cs[4], seed += 10);
  }
  return emu_failures == 0 ? 0 : 1;
}
