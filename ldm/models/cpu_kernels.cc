// Fused float32 normalisation kernels for MindSpore's CPU backend, loaded as AOT custom ops by cpu_kernels.py.
//
// MindSpore 2.10's CPU GroupNorm, GroupNormGrad and LayerNormGrad kernels take several times as long as PyTorch's
// (benchmarks/README.md, "CPU norm kernels"); these compute the same statistics with vectorised sums over each group
// or row, split across threads. Every function has MindSpore's AOT signature: params holds the inputs, then the
// outputs; shapes/ndims describe them in the same order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

// Threads for one call: $OMP_NUM_THREADS (MindSpore sets it to its CPU thread count), else the hardware's.
int64_t ThreadCount() {
  static const int64_t count = [] {
    const char *env = std::getenv("OMP_NUM_THREADS");
    const int64_t n = env ? std::atoll(env) : static_cast<int64_t>(std::thread::hardware_concurrency());
    return std::max<int64_t>(1, n);
  }();
  return count;
}

// Runs body(i) for i in [0, n) on up to ThreadCount() threads, in contiguous chunks; `work` is the element count,
// and small calls stay on the calling thread. Threads are started per call and joined, so nothing spins between
// calls on a machine whose cores the framework's own kernels need.
template <typename Body>
void ParallelFor(int64_t n, int64_t work, Body body) {
  constexpr int64_t kMinWorkPerThread = 1 << 16;
  const int64_t threads = std::min({ThreadCount(), n, std::max<int64_t>(1, work / kMinWorkPerThread)});
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  auto run = [&](int64_t t) {
    for (int64_t i = n * t / threads; i < n * (t + 1) / threads; ++i) body(i);
  };
  std::vector<std::thread> helpers;
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(run, t);
  run(0);
  for (auto &h : helpers) h.join();
}

// Sums in float SIMD lanes over chunks of kChunk elements, the chunks added in double: vectorised, and as accurate
// as a double sum for the sizes a norm sees.
constexpr int64_t kChunk = 2048;

double Sum(const float *x, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) s += x[i];
    total += s;
  }
  return total;
}

double SumSquaredDeviation(const float *x, int64_t n, float mean) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) s += (x[i] - mean) * (x[i] - mean);
    total += s;
  }
  return total;
}

// The two layouts every kernel pair shares: forward (x, weight, bias, cfg) -> (y, mean, rstd), backward
// (x, weight, bias, cfg, mean, rstd, dy) -> (dx, dweight, dbias).
struct ForwardArgs {
  explicit ForwardArgs(void **p)
      : x(static_cast<const float *>(p[0])),
        weight(static_cast<const float *>(p[1])),
        bias(static_cast<const float *>(p[2])),
        cfg(static_cast<const float *>(p[3])),
        y(static_cast<float *>(p[4])),
        mean(static_cast<float *>(p[5])),
        rstd(static_cast<float *>(p[6])) {}
  const float *x, *weight, *bias, *cfg;
  float *y, *mean, *rstd;
};

struct BackwardArgs {
  explicit BackwardArgs(void **p)
      : x(static_cast<const float *>(p[0])),
        weight(static_cast<const float *>(p[1])),
        cfg(static_cast<const float *>(p[3])),
        mean(static_cast<const float *>(p[4])),
        rstd(static_cast<const float *>(p[5])),
        dy(static_cast<const float *>(p[6])),
        dx(static_cast<float *>(p[7])),
        dweight(static_cast<float *>(p[8])),
        dbias(static_cast<float *>(p[9])) {}
  const float *x, *weight, *cfg, *mean, *rstd, *dy;
  float *dx, *dweight, *dbias;
};

// dweight and dbias: the per-column sums over `parts` rows of partial sums (`width` columns each), rows in order.
void SumPartials(const std::vector<double> &part_w, const std::vector<double> &part_b, int64_t parts, int64_t width,
                 float *dweight, float *dbias) {
  for (int64_t i = 0; i < width; ++i) {
    double sw = 0.0, sb = 0.0;
    for (int64_t part = 0; part < parts; ++part) {
      sw += part_w[part * width + i];
      sb += part_b[part * width + i];
    }
    dweight[i] = static_cast<float>(sw);
    dbias[i] = static_cast<float>(sb);
  }
}

int64_t Product(const int64_t *shape, int begin, int end) {
  int64_t n = 1;
  for (int i = begin; i < end; ++i) n *= shape[i];
  return n;
}

}  // namespace

// GroupNorm forward. Inputs: x (N, C, *), weight (C), bias (C), cfg (groups, eps).
// Outputs: y (like x), mean (N * groups), rstd (N * groups).
extern "C" int GroupNormForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const ForwardArgs a(params);
  const float *x = a.x, *weight = a.weight, *bias = a.bias, *cfg = a.cfg;
  float *y = a.y, *mean_out = a.mean, *rstd_out = a.rstd;
  const int64_t n = shapes[0][0], channels = shapes[0][1], hw = Product(shapes[0], 2, ndims[0]);
  const int64_t groups = static_cast<int64_t>(cfg[0]);
  const double eps = cfg[1];
  const int64_t per_group = channels / groups, block = per_group * hw;
  ParallelFor(n * groups, n * channels * hw, [&](int64_t ng) {
    const float *xb = x + ng * block;
    const double mean = Sum(xb, block) / block;
    const float rstd = static_cast<float>(1.0 / std::sqrt(SumSquaredDeviation(xb, block, mean) / block + eps));
    mean_out[ng] = static_cast<float>(mean);
    rstd_out[ng] = rstd;
    const int64_t first = (ng % groups) * per_group;
    for (int64_t c = 0; c < per_group; ++c) {
      const float scale = rstd * weight[first + c];
      const float shift = bias[first + c] - static_cast<float>(mean) * scale;
      const float *xr = xb + c * hw;
      float *yr = y + ng * block + c * hw;
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) yr[i] = xr[i] * scale + shift;
    }
  });
  return 0;
}

// GroupNorm backward. Inputs: x, weight, bias, cfg, mean, rstd, dy. Outputs: dx (like x), dweight (C), dbias (C).
extern "C" int GroupNormBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const BackwardArgs a(params);
  const float *x = a.x, *weight = a.weight, *cfg = a.cfg, *mean = a.mean, *rstd = a.rstd, *dy = a.dy;
  float *dx = a.dx, *dweight = a.dweight, *dbias = a.dbias;
  const int64_t n = shapes[0][0], channels = shapes[0][1], hw = Product(shapes[0], 2, ndims[0]);
  const int64_t groups = static_cast<int64_t>(cfg[0]);
  const int64_t per_group = channels / groups, block = per_group * hw;
  std::vector<double> part_w(n * channels), part_b(n * channels);  // per sample, summed over samples below
  ParallelFor(n * groups, n * channels * hw, [&](int64_t ng) {
    const float m = mean[ng], r = rstd[ng];
    const float *xb = x + ng * block;
    const float *dyb = dy + ng * block;
    float *dxb = dx + ng * block;
    const int64_t first = (ng % groups) * per_group, sample = ng / groups;
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t c = 0; c < per_group; ++c) {
      const float w = weight[first + c];
      double acc_w = 0.0, acc_b = 0.0;
      for (int64_t start = 0; start < hw; start += kChunk) {
        const int64_t end = std::min(hw, start + kChunk);
        float cw = 0.0f, cb = 0.0f, cg = 0.0f, cgx = 0.0f;
#pragma omp simd reduction(+ : cw, cb, cg, cgx)
        for (int64_t i = start; i < end; ++i) {
          const int64_t k = c * hw + i;
          const float xhat = (xb[k] - m) * r;
          const float g = dyb[k];
          cw += g * xhat;
          cb += g;
          const float gx = g * w;  // gradient at xhat, kept in dx until the group's sums are known
          dxb[k] = gx;
          cg += gx;
          cgx += gx * xhat;
        }
        acc_w += cw;
        acc_b += cb;
        sum_g += cg;
        sum_gx += cgx;
      }
      part_w[sample * channels + first + c] = acc_w;
      part_b[sample * channels + first + c] = acc_b;
    }
    const float mean_g = static_cast<float>(sum_g / block), mean_gx = static_cast<float>(sum_gx / block);
#pragma omp simd
    for (int64_t k = 0; k < block; ++k) {
      const float xhat = (xb[k] - m) * r;
      dxb[k] = r * (dxb[k] - mean_g - xhat * mean_gx);
    }
  });
  SumPartials(part_w, part_b, n, channels, dweight, dbias);
  return 0;
}

// LayerNorm over the last dimension, forward. Inputs: x (*, C), weight (C), bias (C), cfg (eps).
// Outputs: y (like x), mean (rows), rstd (rows).
extern "C" int LayerNormForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const ForwardArgs a(params);
  const float *x = a.x, *weight = a.weight, *bias = a.bias, *cfg = a.cfg;
  float *y = a.y, *mean_out = a.mean, *rstd_out = a.rstd;
  const int64_t width = shapes[0][ndims[0] - 1], rows = Product(shapes[0], 0, ndims[0] - 1);
  const double eps = cfg[0];
  ParallelFor(rows, rows * width, [&](int64_t row) {
    const float *xr = x + row * width;
    const double mean = Sum(xr, width) / width;
    const float rstd = static_cast<float>(1.0 / std::sqrt(SumSquaredDeviation(xr, width, mean) / width + eps));
    const float m = static_cast<float>(mean);
    mean_out[row] = m;
    rstd_out[row] = rstd;
    float *yr = y + row * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) yr[i] = (xr[i] - m) * rstd * weight[i] + bias[i];
  });
  return 0;
}

// LayerNorm backward. Inputs: x, weight, bias, cfg, mean, rstd, dy. Outputs: dx (like x), dweight (C), dbias (C).
extern "C" int LayerNormBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const BackwardArgs a(params);
  const float *x = a.x, *weight = a.weight, *mean = a.mean, *rstd = a.rstd, *dy = a.dy;
  float *dx = a.dx, *dweight = a.dweight, *dbias = a.dbias;
  const int64_t width = shapes[0][ndims[0] - 1], rows = Product(shapes[0], 0, ndims[0] - 1);
  ParallelFor(rows, rows * width, [&](int64_t row) {
    const float m = mean[row], r = rstd[row];
    const float *xr = x + row * width;
    const float *dyr = dy + row * width;
    float *dxr = dx + row * width;
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t i = 0; i < width; ++i) {
      const float gx = dyr[i] * weight[i];
      sum_g += gx;
      sum_gx += gx * ((xr[i] - m) * r);
    }
    const float mean_g = sum_g / width, mean_gx = sum_gx / width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float xhat = (xr[i] - m) * r;
      dxr[i] = r * (dyr[i] * weight[i] - mean_g - xhat * mean_gx);
    }
  });
  // Parameter gradients: each part of the rows sums into its own row of partials, the parts added in order.
  const int64_t parts = std::min(ThreadCount(), rows);
  std::vector<double> part_w(parts * width, 0.0), part_b(parts * width, 0.0);
  ParallelFor(parts, rows * width, [&](int64_t part) {
    double *sw = part_w.data() + part * width;
    double *sb = part_b.data() + part * width;
    for (int64_t row = rows * part / parts; row < rows * (part + 1) / parts; ++row) {
      const float m = mean[row], r = rstd[row];
      const float *xr = x + row * width;
      const float *dyr = dy + row * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        sw[i] += dyr[i] * ((xr[i] - m) * r);
        sb[i] += dyr[i];
      }
    }
  });
  SumPartials(part_w, part_b, parts, width, dweight, dbias);
  return 0;
}

