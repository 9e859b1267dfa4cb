// The Mamba-1 selective scan on the CPU: forward and exact backward (float32 and float64).
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t      h: (batch, d_inner, N)
//   y_t = sum_n C_t[n] * h_t[:, :, n] + D * x_t
//
// Shapes: x, dt (B, L, d_inner); A (d_inner, N); Bm, Cm (B, L, N); D (d_inner,); h0 (B, d_inner, N) or none.
// All inputs contiguous, on the CPU, of one dtype (adamba/model/scan_cpu.py sees to that).
//
// Work split: a task is one batch row and a block of CB consecutive channels; time runs sequentially inside
// the task, and the block's state (N x CB values) stays in a small local array whose inner loop runs over
// the CB channels (vectorised whatever N is; x, dt and y of the block are contiguous for each t). Tasks run
// in parallel with at::parallel_for (ATen's OpenMP pool, so torch.set_num_threads applies).
//
// Backward: the forward stores the state every K steps (`ckpt`, (B, ceil(L/K), N, d_inner)); the backward
// walks the chunks from last to first, recomputes each chunk's K states and decays from its checkpoint into
// a local buffer, then runs the reverse-time recurrence over it:
//   g_t   = gh_t + C_t * gy_t            (gh_t: gradient arriving from step t+1, a_{t+1} * g_{t+1}; gh_L = dh_L)
//   dC_t += gy_t * h_t                    dB_t += g_t * dt_t * x_t          (both summed over channels)
//   dx_t  = D gy_t + dt_t sum_n g_t B_t   ddt_t = sum_n (g_t h_{t-1} a_t A + g_t x_t B_t)
//   dA   += g_t h_{t-1} a_t dt_t          dD += gy_t x_t                    dh0 = a_1 * g_1
// Extra memory: O(B * d_inner * N * L / K) for the checkpoints, plus per-task partial sums for the gradients
// that are reduced over channels (dB, dC: one (B, L, N) slice per channel group) or over the batch (dA, dD).
// Every partial sum is owned by one task, so results do not depend on thread scheduling.
//
// exp: float64 uses std::exp (libm); float32 a branch-free Cephes-style expf (~2 ulp) the compiler can
// vectorise. No -ffast-math anywhere. On x86-64 with GCC, the hot loops are compiled for AVX2+FMA and
// AVX-512 as well as the baseline and picked at run time (target_clones), so the built module stays valid
// on any x86-64 machine.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t CB = 16;  // channels per task block

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SCAN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SCAN_CLONES
#endif
#define SCAN_INLINE inline __attribute__((always_inline))

SCAN_INLINE float exp_approx(float x) {
  // exp(x) = 2^k * exp(r), k = round(x / ln2), |r| <= ln2/2; exp(r) by the Cephes expf polynomial.
  const float lo = -87.33654f, hi = 88.37626f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float k = (xc * 1.44269504088896341f + magic) - magic;
  const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  return x < lo ? 0.0f : p * scale;  // NaN input: p is NaN and stays NaN
}

SCAN_INLINE double exp_approx(double x) { return std::exp(x); }

template <typename T>
struct Args {
  const T *x, *dt, *A, *Bm, *Cm, *D, *h0;  // h0 may be null
  int64_t batch, L, Dn, N, K, n_chunks, n_blocks;
};

template <typename T>
struct FwdOut {
  T *y, *hL, *ckpt;  // ckpt may be null
};

template <typename T>
struct BwdOut {
  const T *ckpt, *gy, *ghL;
  T *dx, *ddt, *dA_part, *dB_part, *dC_part, *dD_part, *dh0;  // dh0 may be null
  int64_t n_groups;
};

template <typename T>
SCAN_INLINE void load_block(const T* src, int64_t nc, T* dst) {
  if (nc == CB) {  // full block: fixed-size copy, no library call
    for (int64_t c = 0; c < CB; ++c) dst[c] = src[c];
    return;
  }
  for (int64_t c = 0; c < nc; ++c) dst[c] = src[c];
  for (int64_t c = nc; c < CB; ++c) dst[c] = T(0);
}

// Block setup shared by forward and backward: A transposed to [n][c], zero-padded past nc.
template <typename T>
SCAN_INLINE void load_A(const Args<T>& a, int64_t d0, int64_t nc, T* AT) {
  for (int64_t n = 0; n < a.N; ++n)
    for (int64_t c = 0; c < CB; ++c) AT[n * CB + c] = c < nc ? a.A[(d0 + c) * a.N + n] : T(0);
}

// Forward of one (batch row, channel block). work: 2 * N * CB.
template <typename T>
SCAN_INLINE void fwd_task_impl(const Args<T>& a, const FwdOut<T>& o, int64_t task, T* work) {
  const int64_t b = task / a.n_blocks, d0 = (task % a.n_blocks) * CB, nc = std::min(CB, a.Dn - d0);
  const int64_t N = a.N, Dn = a.Dn;
  T* AT = work;
  T* h = work + N * CB;
  load_A(a, d0, nc, AT);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < CB; ++c) h[n * CB + c] = (a.h0 && c < nc) ? a.h0[(b * Dn + d0 + c) * N + n] : T(0);
  T Dl[CB], dtl[CB], ul[CB], yl[CB], xl[CB];
  load_block(a.D + d0, nc, Dl);
  for (int64_t t = 0; t < a.L; ++t) {
    if (o.ckpt && t % a.K == 0) {
      T* dst = o.ckpt + ((b * a.n_chunks + t / a.K) * N) * Dn + d0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < nc; ++c) dst[n * Dn + c] = h[n * CB + c];
    }
    const int64_t row = (b * a.L + t);
    load_block(a.x + row * Dn + d0, nc, xl);
    load_block(a.dt + row * Dn + d0, nc, dtl);
    for (int64_t c = 0; c < CB; ++c) {
      ul[c] = dtl[c] * xl[c];
      yl[c] = T(0);
    }
    const T* Bt = a.Bm + row * N;
    const T* Ct = a.Cm + row * N;
    for (int64_t n = 0; n < N; ++n) {
      const T bn = Bt[n], cn = Ct[n];
      T* hn = h + n * CB;
      const T* An = AT + n * CB;
#pragma omp simd
      for (int64_t c = 0; c < CB; ++c) {
        hn[c] = exp_approx(dtl[c] * An[c]) * hn[c] + ul[c] * bn;
        yl[c] += cn * hn[c];
      }
    }
    T* yt = o.y + row * Dn + d0;
    for (int64_t c = 0; c < nc; ++c) yt[c] = yl[c] + Dl[c] * xl[c];
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < nc; ++c) o.hL[(b * Dn + d0 + c) * N + n] = h[n * CB + c];
}

// Backward of one channel block of one batch row; dB/dC partial sums go to the slices of `group`.
// work: N*CB (AT) + N*CB (gh) + N*CB (dA) + (K+1)*N*CB (states) + K*N*CB (decays).
template <typename T>
SCAN_INLINE void bwd_block_impl(const Args<T>& a, const BwdOut<T>& o, int64_t b, int64_t blk, int64_t group,
                                T* work) {
  const int64_t d0 = blk * CB, nc = std::min(CB, a.Dn - d0);
  const int64_t N = a.N, Dn = a.Dn, K = a.K, NC = N * CB;
  T* AT = work;
  T* gh = AT + NC;
  T* dAacc = gh + NC;
  T* hbuf = dAacc + NC;
  T* abuf = hbuf + (K + 1) * NC;
  load_A(a, d0, nc, AT);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < CB; ++c) {
      gh[n * CB + c] = c < nc ? o.ghL[(b * Dn + d0 + c) * N + n] : T(0);
      dAacc[n * CB + c] = T(0);
    }
  T Dl[CB], dDacc[CB], dtl[CB], ul[CB], xl[CB], gyl[CB], dxl[CB], ddtl[CB];
  load_block(a.D + d0, nc, Dl);
  for (int64_t c = 0; c < CB; ++c) dDacc[c] = T(0);
  T* dBg = o.dB_part + (group * a.batch + b) * a.L * N;
  T* dCg = o.dC_part + (group * a.batch + b) * a.L * N;

  for (int64_t chunk = a.n_chunks - 1; chunk >= 0; --chunk) {
    const int64_t t0 = chunk * K, len = std::min(K, a.L - t0);
    // recompute the chunk's states h_{t0-1 .. t0+len-1} (hbuf[0 .. len]) and decays a_t (abuf[0 .. len-1])
    const T* src = o.ckpt + ((b * a.n_chunks + chunk) * N) * Dn + d0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < CB; ++c) hbuf[n * CB + c] = c < nc ? src[n * Dn + c] : T(0);
    for (int64_t i = 0; i < len; ++i) {
      const int64_t row = b * a.L + t0 + i;
      load_block(a.x + row * Dn + d0, nc, xl);
      load_block(a.dt + row * Dn + d0, nc, dtl);
      for (int64_t c = 0; c < CB; ++c) ul[c] = dtl[c] * xl[c];
      const T* Bt = a.Bm + row * N;
      const T* hp = hbuf + i * NC;
      T* hn = hbuf + (i + 1) * NC;
      T* an = abuf + i * NC;
      for (int64_t n = 0; n < N; ++n) {
        const T bn = Bt[n];
#pragma omp simd
        for (int64_t c = 0; c < CB; ++c) {
          const T dec = exp_approx(dtl[c] * AT[n * CB + c]);
          an[n * CB + c] = dec;
          hn[n * CB + c] = dec * hp[n * CB + c] + ul[c] * bn;
        }
      }
    }
    // reverse time over the chunk
    for (int64_t i = len - 1; i >= 0; --i) {
      const int64_t t = t0 + i, row = b * a.L + t;
      load_block(a.x + row * Dn + d0, nc, xl);
      load_block(a.dt + row * Dn + d0, nc, dtl);
      load_block(o.gy + row * Dn + d0, nc, gyl);
      for (int64_t c = 0; c < CB; ++c) {
        ul[c] = dtl[c] * xl[c];
        dxl[c] = T(0);
        ddtl[c] = T(0);
      }
      const T* Bt = a.Bm + row * N;
      const T* Ct = a.Cm + row * N;
      const T* hcur = hbuf + (i + 1) * NC;
      const T* hprev = hbuf + i * NC;
      const T* an = abuf + i * NC;
      T* dBt = dBg + t * N;
      T* dCt = dCg + t * N;
      for (int64_t n = 0; n < N; ++n) {
        const T bn = Bt[n], cn = Ct[n];
        T sB = T(0), sC = T(0);
#pragma omp simd reduction(+ : sB, sC)
        for (int64_t c = 0; c < CB; ++c) {
          const int64_t k = n * CB + c;
          const T g = gh[k] + cn * gyl[c];
          sC += gyl[c] * hcur[k];
          sB += g * ul[c];
          dxl[c] += g * bn;
          const T da = g * hprev[k] * an[k];  // dL/d(dt*A) for this (n, c)
          ddtl[c] += da * AT[k] + g * xl[c] * bn;
          dAacc[k] += da * dtl[c];
          gh[k] = an[k] * g;
        }
        dBt[n] += sB;
        dCt[n] += sC;
      }
      T* dxt = o.dx + row * Dn + d0;
      T* ddtt = o.ddt + row * Dn + d0;
      for (int64_t c = 0; c < nc; ++c) {
        dxt[c] = Dl[c] * gyl[c] + dtl[c] * dxl[c];
        ddtt[c] = ddtl[c];
      }
      for (int64_t c = 0; c < CB; ++c) dDacc[c] += gyl[c] * xl[c];
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < nc; ++c) {
      o.dA_part[(b * Dn + d0 + c) * N + n] = dAacc[n * CB + c];
      if (o.dh0) o.dh0[(b * Dn + d0 + c) * N + n] = gh[n * CB + c];
    }
  for (int64_t c = 0; c < nc; ++c) o.dD_part[b * Dn + d0 + c] = dDacc[c];
}

// The blocks of a group: group g of G takes blocks g, g + G, g + 2G, ...
template <typename T>
SCAN_INLINE void bwd_task_impl(const Args<T>& a, const BwdOut<T>& o, int64_t task, T* work) {
  const int64_t b = task / o.n_groups, g = task % o.n_groups;
  for (int64_t blk = g; blk < a.n_blocks; blk += o.n_groups) bwd_block_impl(a, o, b, blk, g, work);
}

// Concrete entry points, compiled once per target_clones target.
SCAN_CLONES void fwd_task_f32(const Args<float>& a, const FwdOut<float>& o, int64_t task, float* w) {
  fwd_task_impl(a, o, task, w);
}
SCAN_CLONES void fwd_task_f64(const Args<double>& a, const FwdOut<double>& o, int64_t task, double* w) {
  fwd_task_impl(a, o, task, w);
}
SCAN_CLONES void bwd_task_f32(const Args<float>& a, const BwdOut<float>& o, int64_t task, float* w) {
  bwd_task_impl(a, o, task, w);
}
SCAN_CLONES void bwd_task_f64(const Args<double>& a, const BwdOut<double>& o, int64_t task, double* w) {
  bwd_task_impl(a, o, task, w);
}

void fwd_task(const Args<float>& a, const FwdOut<float>& o, int64_t t, float* w) { fwd_task_f32(a, o, t, w); }
void fwd_task(const Args<double>& a, const FwdOut<double>& o, int64_t t, double* w) { fwd_task_f64(a, o, t, w); }
void bwd_task(const Args<float>& a, const BwdOut<float>& o, int64_t t, float* w) { bwd_task_f32(a, o, t, w); }
void bwd_task(const Args<double>& a, const BwdOut<double>& o, int64_t t, double* w) { bwd_task_f64(a, o, t, w); }

void check_inputs(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                  const at::Tensor& Cm, const at::Tensor& D, const c10::optional<at::Tensor>& h0, int64_t K) {
  TORCH_CHECK(x.dim() == 3, "x must be (batch, L, d_inner)");
  const auto batch = x.size(0), L = x.size(1), Dn = x.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == Dn, "A must be (d_inner, N)");
  const auto N = A.size(1);
  TORCH_CHECK(dt.sizes() == x.sizes(), "dt must have x's shape");
  TORCH_CHECK(Bm.dim() == 3 && Bm.size(0) == batch && Bm.size(1) == L && Bm.size(2) == N, "B must be (batch, L, N)");
  TORCH_CHECK(Cm.sizes() == Bm.sizes(), "C must be (batch, L, N)");
  TORCH_CHECK(D.dim() == 1 && D.size(0) == Dn, "D must be (d_inner,)");
  TORCH_CHECK(K >= 1, "checkpoint interval must be >= 1");
  std::vector<at::Tensor> all = {x, dt, A, Bm, Cm, D};
  if (h0.has_value()) {
    TORCH_CHECK(h0->dim() == 3 && h0->size(0) == batch && h0->size(1) == Dn && h0->size(2) == N,
                "h0 must be (batch, d_inner, N)");
    all.push_back(*h0);
  }
  for (const auto& t : all) {
    TORCH_CHECK(t.device().is_cpu(), "selective_scan (CPU kernel): inputs must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), "selective_scan (CPU kernel): inputs must be contiguous");
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "selective_scan (CPU kernel): inputs must share x's dtype");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "selective_scan (CPU kernel): float32 or float64 only");
}

template <typename T>
Args<T> make_args(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                  const at::Tensor& Cm, const at::Tensor& D, const c10::optional<at::Tensor>& h0, int64_t K) {
  Args<T> a;
  a.x = x.data_ptr<T>();
  a.dt = dt.data_ptr<T>();
  a.A = A.data_ptr<T>();
  a.Bm = Bm.data_ptr<T>();
  a.Cm = Cm.data_ptr<T>();
  a.D = D.data_ptr<T>();
  a.h0 = h0.has_value() ? h0->data_ptr<T>() : nullptr;
  a.batch = x.size(0);
  a.L = x.size(1);
  a.Dn = x.size(2);
  a.N = A.size(1);
  a.K = K;
  a.n_chunks = (a.L + K - 1) / K;
  a.n_blocks = (a.Dn + CB - 1) / CB;
  return a;
}

}  // namespace

// Returns (y, h_L, ckpt); ckpt is an empty tensor unless save_checkpoints.
std::vector<at::Tensor> scan_forward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                     const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D,
                                     const c10::optional<at::Tensor>& h0, bool save_checkpoints, int64_t K) {
  check_inputs(x, dt, A, Bm, Cm, D, h0, K);
  const auto batch = x.size(0), L = x.size(1), Dn = x.size(2), N = A.size(1);
  auto y = at::empty_like(x);
  auto hL = at::empty({batch, Dn, N}, x.options());
  const int64_t n_chunks = (L + K - 1) / K;
  auto ckpt = save_checkpoints ? at::empty({batch, n_chunks, N, Dn}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adamba_scan_forward", [&] {
    const auto a = make_args<scalar_t>(x, dt, A, Bm, Cm, D, h0, K);
    const FwdOut<scalar_t> o{y.data_ptr<scalar_t>(), hL.data_ptr<scalar_t>(),
                             save_checkpoints ? ckpt.data_ptr<scalar_t>() : nullptr};
    at::parallel_for(0, batch * a.n_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work(2 * N * CB);
      for (int64_t task = begin; task < end; ++task) fwd_task(a, o, task, work.data());
    });
  });
  return {y, hL, ckpt};
}

// Returns (dx, ddt, dA, dB, dC, dD, dh0); dh0 is an empty tensor when h0 is none.
std::vector<at::Tensor> scan_backward(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                      const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D,
                                      const c10::optional<at::Tensor>& h0, const at::Tensor& ckpt,
                                      const at::Tensor& grad_y, const at::Tensor& grad_hL, int64_t K) {
  check_inputs(x, dt, A, Bm, Cm, D, h0, K);
  const auto batch = x.size(0), L = x.size(1), Dn = x.size(2), N = A.size(1);
  const int64_t n_chunks = (L + K - 1) / K, n_blocks = (Dn + CB - 1) / CB;
  TORCH_CHECK(ckpt.sizes() == at::IntArrayRef({batch, n_chunks, N, Dn}) && ckpt.is_contiguous(),
              "bad checkpoint tensor");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous() && grad_y.scalar_type() == x.scalar_type(),
              "grad_y must be contiguous, with x's shape and dtype");
  TORCH_CHECK(grad_hL.dim() == 3 && grad_hL.size(0) == batch && grad_hL.size(1) == Dn && grad_hL.size(2) == N &&
                  grad_hL.is_contiguous() && grad_hL.scalar_type() == x.scalar_type(),
              "grad_hL must be contiguous, (batch, d_inner, N), with x's dtype");
  // Channel groups for the dB/dC partial sums: enough (batch row, group) tasks to keep every thread busy.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n_groups = std::max<int64_t>(1, std::min<int64_t>(n_blocks, (2 * threads + batch - 1) / batch));
  auto dx = at::empty_like(x);
  auto ddt = at::empty_like(x);
  auto dA_part = at::empty({batch, Dn, N}, x.options());
  auto dB_part = at::zeros({n_groups, batch, L, N}, x.options());
  auto dC_part = at::zeros({n_groups, batch, L, N}, x.options());
  auto dD_part = at::empty({batch, Dn}, x.options());
  auto dh0 = h0.has_value() ? at::empty({batch, Dn, N}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adamba_scan_backward", [&] {
    const auto a = make_args<scalar_t>(x, dt, A, Bm, Cm, D, h0, K);
    const BwdOut<scalar_t> o{ckpt.data_ptr<scalar_t>(), grad_y.data_ptr<scalar_t>(), grad_hL.data_ptr<scalar_t>(),
                             dx.data_ptr<scalar_t>(), ddt.data_ptr<scalar_t>(), dA_part.data_ptr<scalar_t>(),
                             dB_part.data_ptr<scalar_t>(), dC_part.data_ptr<scalar_t>(), dD_part.data_ptr<scalar_t>(),
                             h0.has_value() ? dh0.data_ptr<scalar_t>() : nullptr, n_groups};
    at::parallel_for(0, batch * n_groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work((3 + (K + 1) + K) * N * CB);
      for (int64_t task = begin; task < end; ++task) bwd_task(a, o, task, work.data());
    });
  });
  auto dB = n_groups == 1 ? dB_part[0] : dB_part.sum(0);
  auto dC = n_groups == 1 ? dC_part[0] : dC_part.sum(0);
  return {dx, ddt, dA_part.sum(0), dB, dC, dD_part.sum(0), dh0};
}

// One decoding step (a single token per row), in place on the state, gate included:
//   h = exp(dt * A) * h + dt * B * x;   y = (sum_n C[n] * h[:, :, n] + D * x) * silu(z)
// x, dt (B, d_inner) contiguous; z (B, d_inner), Bm, Cm (B, N) with unit column stride (views into the
// projections' outputs); A (d_inner, N); D (d_inner,); h (B, d_inner, N) contiguous, updated in place.
// One pass over the state, where the PyTorch form makes about ten (each over B x d_inner x N values) and
// a batch-1 step is dominated by their per-op overhead.
namespace {

template <typename T>
SCAN_INLINE void step_rows_impl(const T* x, const T* dt, const T* z, int64_t z_row, const T* A, const T* Bm,
                                const T* Cm, int64_t bc_row, const T* D, T* h, T* y, int64_t Dn, int64_t N,
                                int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {  // i = row * Dn + channel
    const int64_t row = i / Dn, d = i % Dn;
    const T xv = x[i], dtv = dt[i], zv = z[row * z_row + d];
    const T* a = A + d * N;
    const T* bm = Bm + row * bc_row;
    const T* cm = Cm + row * bc_row;
    T* hi = h + i * N;
    T acc = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T hn = exp_approx(dtv * a[n]) * hi[n] + dtv * bm[n] * xv;
      hi[n] = hn;
      acc += cm[n] * hn;
    }
    y[i] = (acc + D[d] * xv) * (zv / (T(1) + std::exp(-zv)));
  }
}

SCAN_CLONES void step_rows_f32(const float* x, const float* dt, const float* z, int64_t z_row, const float* A,
                               const float* Bm, const float* Cm, int64_t bc_row, const float* D, float* h, float* y,
                               int64_t Dn, int64_t N, int64_t begin, int64_t end) {
  step_rows_impl(x, dt, z, z_row, A, Bm, Cm, bc_row, D, h, y, Dn, N, begin, end);
}
SCAN_CLONES void step_rows_f64(const double* x, const double* dt, const double* z, int64_t z_row, const double* A,
                               const double* Bm, const double* Cm, int64_t bc_row, const double* D, double* h,
                               double* y, int64_t Dn, int64_t N, int64_t begin, int64_t end) {
  step_rows_impl(x, dt, z, z_row, A, Bm, Cm, bc_row, D, h, y, Dn, N, begin, end);
}
void step_rows(const float* x, const float* dt, const float* z, int64_t z_row, const float* A, const float* Bm,
               const float* Cm, int64_t bc_row, const float* D, float* h, float* y, int64_t Dn, int64_t N,
               int64_t begin, int64_t end) {
  step_rows_f32(x, dt, z, z_row, A, Bm, Cm, bc_row, D, h, y, Dn, N, begin, end);
}
void step_rows(const double* x, const double* dt, const double* z, int64_t z_row, const double* A, const double* Bm,
               const double* Cm, int64_t bc_row, const double* D, double* h, double* y, int64_t Dn, int64_t N,
               int64_t begin, int64_t end) {
  step_rows_f64(x, dt, z, z_row, A, Bm, Cm, bc_row, D, h, y, Dn, N, begin, end);
}

}  // namespace

at::Tensor scan_step(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& z, const at::Tensor& A,
                     const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& D, at::Tensor h) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "scan step (CPU kernel): float32 or float64 only");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&dt, &z, &A, &Bm, &Cm, &D, &h})
    TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu(), "scan step: every input must match x's dtype, on the CPU");
  const auto batch = x.size(0), Dn = x.size(1), N = A.size(1);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && dt.sizes() == x.sizes() && dt.is_contiguous(),
              "scan step: x and dt must be contiguous (batch, d_inner)");
  TORCH_CHECK(z.sizes() == x.sizes() && z.stride(1) == 1, "scan step: z must be (batch, d_inner), unit column stride");
  TORCH_CHECK(Bm.dim() == 2 && Bm.size(0) == batch && Bm.size(1) == N && Bm.stride(1) == 1 &&
                  Cm.sizes() == Bm.sizes() && Cm.stride(0) == Bm.stride(0) && Cm.stride(1) == 1,
              "scan step: B and C must be (batch, N) with unit column stride and one row stride");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == Dn && A.is_contiguous() && D.numel() == Dn && D.is_contiguous(),
              "scan step: A must be contiguous (d_inner, N), D (d_inner,)");
  TORCH_CHECK(h.dim() == 3 && h.size(0) == batch && h.size(1) == Dn && h.size(2) == N && h.is_contiguous(),
              "scan step: the state must be contiguous (batch, d_inner, N)");
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(dtype, "adamba_scan_step", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *dtp = dt.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>(),
                   *Ap = A.data_ptr<scalar_t>(), *Bp = Bm.data_ptr<scalar_t>(), *Cp = Cm.data_ptr<scalar_t>(),
                   *Dp = D.data_ptr<scalar_t>();
    scalar_t *hp = h.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    // grain: at least ~32k state values per task, so a small batch runs inline (no thread start-up)
    at::parallel_for(0, batch * Dn, std::max<int64_t>(1, 32768 / N), [&](int64_t begin, int64_t end) {
      step_rows(xp, dtp, zp, z.stride(0), Ap, Bp, Cp, Bm.stride(0), Dp, hp, yp, Dn, N, begin, end);
    });
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &scan_step, "one decoding step of the scan, gate included, in place on the state: y");
  m.def("forward", &scan_forward, "selective scan forward: (y, h_L, checkpoints)");
  m.def("backward", &scan_backward, "selective scan backward: (dx, ddt, dA, dB, dC, dD, dh0)");
}
