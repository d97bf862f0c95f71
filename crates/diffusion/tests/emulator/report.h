// Shared by the emulator's kernel tests: inputs, comparison, one line per case.
#pragma once
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

inline std::vector<float> emu_randn(size_t n, float mean, float std, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(mean, std);
  std::vector<float> v(n);
  for (auto &x : v) x = dist(rng);
  return v;
}

// Largest |a - b|; infinity when either holds a NaN (an element the kernel never wrote).
template <typename T>
inline double emu_max_diff(const std::vector<T> &got, const std::vector<double> &want) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs((double)emu_to_float(got[i]) - want[i]);
    if (std::isnan(d)) return INFINITY;
    worst = std::max(worst, d);
  }
  return worst;
}

inline int emu_failures = 0;

inline void emu_report(const char *kernel, const char *shape, const char *dtype, double diff,
                       double tol) {
  const bool pass = diff <= tol;
  if (!pass) ++emu_failures;
  std::printf("%s %s %s max_abs_diff=%.3g tolerance=%.3g %s\n", kernel, shape, dtype, diff, tol,
              pass ? "PASS" : "FAIL");
}
