// group_norm.cu on the CPU emulator, launched as kernels/cuda.rs launches it (statistics over
// chunks of each group, merged, then applied), against group norm (+ SiLU) in f64 over the same
// rounded inputs. Exit status 1 on any failure.
#include "../../src/kernels/group_norm.cu"
#include "report.h"

constexpr unsigned THREADS = 256;

template <typename T> struct Ops;
#define OPS(T, SUFFIX)                                   \
  template <> struct Ops<T> {                            \
    static constexpr auto partial = gn_partial_##SUFFIX; \
    static constexpr auto apply = gn_apply_##SUFFIX;     \
  };
OPS(float, f32)
OPS(__half, f16)
OPS(__nv_bfloat16, bf16)

template <typename T>
void run(const char *dtype, double tol, std::vector<size_t> dims, size_t groups, bool silu,
         size_t chunk_elems, unsigned seed) {
  const size_t batch = dims[0], channels = dims[1];
  size_t spatial = 1;
  for (size_t i = 2; i < dims.size(); ++i) spatial *= dims[i];
  const size_t numel = batch * channels * spatial, runs = batch * groups;
  const size_t group_size = channels / groups * spatial;
  auto cvt = [](const std::vector<float> &v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = from_f<T>(v[i]);
    return out;
  };
  // An offset per sample, as activations have, so a one-pass variance would lose digits.
  const auto x = cvt(emu_randn(numel, 3.0f, 1.0f, seed));
  const auto w = cvt(emu_randn(channels, 1.0f, 0.5f, seed + 1));
  const auto b = cvt(emu_randn(channels, 0.0f, 0.5f, seed + 2));
  const float eps = 1e-6f;

  std::vector<double> want(numel);
  for (size_t g = 0; g < runs; ++g) {
    double mean = 0, var = 0;
    for (size_t i = 0; i < group_size; ++i) mean += emu_to_float(x[g * group_size + i]);
    mean /= group_size;
    for (size_t i = 0; i < group_size; ++i) {
      const double d = emu_to_float(x[g * group_size + i]) - mean;
      var += d * d;
    }
    var /= group_size;
    for (size_t i = 0; i < group_size; ++i) {
      const size_t idx = g * group_size + i, ch = (idx / spatial) % channels;
      double y = (emu_to_float(x[idx]) - mean) / std::sqrt(var + eps);
      y = y * emu_to_float(w[ch]) + emu_to_float(b[ch]);
      want[idx] = silu ? y / (1 + std::exp(-y)) : y;
    }
  }

  // As kernels/cuda.rs: chunks of at most `chunk_elems` per group.
  const size_t chunks = std::max<size_t>(1, (group_size + chunk_elems - 1) / chunk_elems);
  const size_t chunk = (group_size + chunks - 1) / chunks;
  std::vector<float> part(runs * chunks * 3, NAN), stats(runs * 2, NAN);
  std::vector<T> y(numel, from_f<T>(NAN));
  emu_launch(dim3{(unsigned)runs, (unsigned)chunks}, dim3{THREADS}, 0,
             [&] { Ops<T>::partial(x.data(), part.data(), group_size, chunk); });
  emu_launch(dim3{(unsigned)((runs + THREADS - 1) / THREADS)}, dim3{THREADS}, 0, [&] {
    gn_finalize(part.data(), stats.data(), (uint32_t)runs, (uint32_t)chunks, eps);
  });
  // Fewer blocks than elements: every thread strides over several.
  const unsigned blocks = (unsigned)std::min<size_t>(5, (numel + THREADS - 1) / THREADS);
  emu_launch(dim3{blocks}, dim3{THREADS}, 0, [&] {
    Ops<T>::apply(x.data(), y.data(), stats.data(), w.data(), b.data(), numel, group_size, spatial,
                  channels, silu ? 1u : 0u);
  });
  std::string shape = "[";
  for (size_t i = 0; i < dims.size(); ++i) shape += (i ? "," : "") + std::to_string(dims[i]);
  shape += "] groups " + std::to_string(groups) + " chunks " + std::to_string(chunks) +
           (silu ? " +silu" : "");
  emu_report("group_norm", shape.c_str(), dtype, emu_max_diff(y, want), tol);
}

int main() {
  struct Case {
    std::vector<size_t> dims;
    size_t groups, chunk_elems;
  };
  // The real chunk size (16 Ki elements), and small chunks so a group spans several blocks
  // and the merge of partial statistics is exercised on a small input.
  const Case cases[] = {{{2, 64, 7, 9}, 8, 16384},  {{1, 32, 40, 40}, 4, 16384},
                        {{3, 96, 5}, 32, 16384},     {{1, 32, 1, 1}, 32, 16384},
                        {{2, 16, 17, 19}, 2, 1000}, {{1, 8, 30, 30}, 1, 777}};
  unsigned seed = 1;
  for (const auto &c : cases)
    for (bool silu : {false, true}) {
      run<float>("F32", 1e-4, c.dims, c.groups, silu, c.chunk_elems, seed += 10);
      run<__half>("F16", 2e-2, c.dims, c.groups, silu, c.chunk_elems, seed += 10);
      run<__nv_bfloat16>("BF16", 1.5e-1, c.dims, c.groups, silu, c.chunk_elems, seed += 10);
    }
  return emu_failures == 0 ? 0 : 1;
}
