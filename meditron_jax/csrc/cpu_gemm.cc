// Float32 GEMM for XLA:CPU through the XLA FFI, computed by a host BLAS (oneMKL).
//
// meditron_jax/cpu_gemm.py compiles this file once per (jaxlib, compiler, CPU), hands
// it the BLAS's cblas_sgemm (ILP64) and registers two custom call targets:
// "meditron_cpu_gemm" (below) and "meditron_cpu_causal_attention" (at the end).
// oneMKL runs its sequential layer: the handler cuts C (or a batch
// of products: attention's heads) into tiles computed on XLA's own intra-op thread
// pool, so no second thread pool competes with XLA's for the cores. (oneMKL's GNU
// OpenMP layer, one threaded call per product, measured the same in the model's
// forward and training step; bench/NOTES.md.)
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                         const float*, int64_t, float, float*, int64_t);

Sgemm64 g_sgemm = nullptr;

// C[m, n] (leading dimension ldc) = op(A) @ op(B) + beta * C for one tile.
void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc, float beta = 0.0f) {
  g_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f, a, lda, b,
          ldb, beta, c, ldc);
}

// Tiles are claimed from a counter by the calling thread and by tasks on XLA's pool
// alike. The caller only ever waits for tiles that some thread is already computing,
// so it cannot deadlock when every pool thread is itself inside a GEMM; a task that
// starts after every tile was claimed returns at once (the shared state outlives it).
struct Job {
  std::atomic<int64_t> next{0};
  int64_t tiles = 0;
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable cv;
};

// Runs fn(0..tasks-1) on the calling thread and up to (pool threads - 1) helpers.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const F& fn) {
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), tasks) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < tasks; ++i) fn(i);
    return;
  }
  auto job = std::make_shared<Job>();
  job->tiles = tasks;
  auto work = [job, fn]() {
    for (int64_t i; (i = job->next.fetch_add(1)) < job->tiles;) {
      fn(i);
      std::lock_guard<std::mutex> lock(job->mu);
      if (++job->done == job->tiles) job->cv.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done == job->tiles; });
}

}  // namespace

extern "C" void meditron_cpu_gemm_set_sgemm(void* sgemm) {
  g_sgemm = reinterpret_cast<Sgemm64>(sgemm);
}

// out = op(a) @ op(b): a is [M, K] ([K, M] with trans_a), b is [K, N] ([N, K] with
// trans_b), optionally all with one leading batch dimension ([Bt, ...], out [Bt, M, N]).
static ffi::Error CpuGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                          ffi::ResultBuffer<ffi::F32> out, bool trans_a, bool trans_b,
                          int64_t min_tile_flops) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("meditron cpu_gemm: no BLAS was set");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  const size_t rank = ad.size();
  if ((rank != 2 && rank != 3) || bd.size() != rank || (rank == 3 && ad[0] != bd[0]))
    return ffi::Error::InvalidArgument("meditron cpu_gemm: operands must be [M,K] x [K,N] "
                                       "or [B,M,K] x [B,K,N]");
  const size_t r = rank - 2;  // index of the first matrix dimension
  const int64_t batch = rank == 3 ? ad[0] : 1;
  const int64_t m = trans_a ? ad[r + 1] : ad[r];
  const int64_t k = trans_a ? ad[r] : ad[r + 1];
  const int64_t n = trans_b ? bd[r] : bd[r + 1];
  if ((trans_b ? bd[r + 1] : bd[r]) != k)
    return ffi::Error::InvalidArgument("meditron cpu_gemm: contracting dimensions differ");
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* cp = out->typed_data();
  const int64_t lda = ad[r + 1], ldb = bd[r + 1];
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(cp, cp + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }

  // Tiles: every batch entry, each cut along the longer side of its C while there are
  // fewer entries than threads. Row tiles are contiguous; column tiles stay a multiple
  // of 16 floats (one AVX-512 vector) wide.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_work = (2 * batch * m * n * k) / std::max<int64_t>(min_tile_flops, 1);
  const int64_t want = std::max<int64_t>(1, std::min(threads, by_work));
  const bool split_m = m >= n;
  const int64_t extent = split_m ? m : n;
  const int64_t align = split_m ? 1 : 16;
  int64_t cuts = batch >= want ? 1 : (want + batch - 1) / batch;
  cuts = std::max<int64_t>(1, std::min(cuts, (extent + align - 1) / align));
  const int64_t per = ((extent + cuts - 1) / cuts + align - 1) / align * align;
  const int64_t a_size = m * k, b_size = k * n, c_size = m * n;
  auto tile = [=](int64_t i) {
    const int64_t e = i / cuts, part = i % cuts;
    const float* ae = ap + e * a_size;
    const float* be = bp + e * b_size;
    float* ce = cp + e * c_size;
    const int64_t lo = std::min(extent, part * per);
    const int64_t hi = std::min(extent, lo + per);
    if (lo >= hi) return;
    if (split_m) {
      const float* at = trans_a ? ae + lo : ae + lo * lda;
      Gemm(trans_a, trans_b, hi - lo, n, k, at, lda, be, ldb, ce + lo * n, n);
    } else {
      const float* bt = trans_b ? be + lo * ldb : be + lo;
      Gemm(trans_a, trans_b, m, hi - lo, k, ae, lda, bt, ldb, ce + lo, n);
    }
  };
  ParallelFor(pool, batch * cuts, tile);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeditronCpuGemm, CpuGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<int64_t>("min_tile_flops"));

// ---- causal attention without a cache (forward only) -------------------------------------
//
// o = softmax(mask(q k^T * scale)) v for q [B,T,N,H], k/v [B,T,K,H] (grouped heads:
// query head n reads kv head n / (N/K)), mask: key slot s <= query slot t and the same
// segment id. One task per (row, kv head, block of query slots): the G query heads of a
// block are packed into one [Tq*G, H] matrix, key blocks at or below the diagonal are
// visited with an online softmax, both products are oneMKL GEMMs reading k and v in
// place (leading dimension K*H). Nothing of size [T, T] is ever formed.

namespace {

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 128;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp), written to vectorize.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

}  // namespace

static ffi::Error CpuCausalAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                     ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                     ffi::Buffer<ffi::S32> segments,
                                     ffi::ResultBuffer<ffi::F32> out, float scale) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("meditron cpu_gemm: no BLAS was set");
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4 || kd[0] != qd[0] ||
      kd[1] != qd[1] || kd[3] != qd[3] || kd[2] == 0 || qd[2] % kd[2] != 0)
    return ffi::Error::InvalidArgument("meditron causal attention: q [B,T,N,H], k/v [B,T,K,H]");
  const int64_t batch = qd[0], t_len = qd[1], n_heads = qd[2], h = qd[3], kv_heads = kd[2];
  const int64_t g = n_heads / kv_heads;
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const int32_t* seg = segments.typed_data();
  float* op = out->typed_data();
  const int64_t q_blocks = (t_len + kQueryBlock - 1) / kQueryBlock;
  const int64_t ld_kv = kv_heads * h;

  auto task = [=](int64_t i) {
    // the largest (last) query blocks first: they see the most keys
    const int64_t qb = q_blocks - 1 - i % q_blocks;
    const int64_t head = (i / q_blocks) % kv_heads, row = i / (q_blocks * kv_heads);
    const int64_t t0 = qb * kQueryBlock, tq = std::min(kQueryBlock, t_len - t0);
    const int64_t rows = tq * g;
    std::vector<float> qs(rows * h), s(rows * kKeyBlock), acc(rows * h, 0.0f);
    std::vector<float> m(rows, kNegInf), l(rows, 0.0f);
    for (int64_t t = 0; t < tq; ++t)
      for (int64_t j = 0; j < g; ++j) {
        const float* src = qp + ((row * t_len + t0 + t) * n_heads + head * g + j) * h;
        float* dst = qs.data() + (t * g + j) * h;
        for (int64_t x = 0; x < h; ++x) dst[x] = src[x] * scale;
      }
    const int32_t* srow = seg + row * t_len;
    const int64_t t_last = t0 + tq - 1;
    for (int64_t s0 = 0; s0 <= t_last; s0 += kKeyBlock) {
      const int64_t sk = std::min(kKeyBlock, t_last + 1 - s0);
      const float* kb = kp + (row * t_len + s0) * ld_kv + head * h;
      const float* vb = vp + (row * t_len + s0) * ld_kv + head * h;
      Gemm(false, true, rows, sk, h, qs.data(), h, kb, ld_kv, s.data(), sk);
      // one segment across this key block (no packing): only causality masks it
      const int32_t block_seg = srow[s0];
      bool one_segment = true;
      for (int64_t c = 1; c < sk; ++c) one_segment &= srow[s0 + c] == block_seg;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r / g;
        float* sr = s.data() + r * sk;
        const int64_t visible = std::min(sk, t - s0 + 1);  // causal: keys s0 .. t
        if (!(one_segment && block_seg == srow[t])) {
          for (int64_t c = 0; c < visible; ++c)
            if (srow[s0 + c] != srow[t]) sr[c] = kNegInf;
        }
        float mx = m[r];
        for (int64_t c = 0; c < visible; ++c) mx = std::max(mx, sr[c]);
        if (mx == kNegInf) {  // nothing visible yet
          std::fill(sr, sr + sk, 0.0f);
          continue;
        }
        const float alpha = ExpNonPositive(m[r] - mx);  // m = -inf: clamped, ~0
        float sum = 0.0f;
        for (int64_t c = 0; c < visible; ++c) {  // masked entries are -inf: exp -> 0
          const float p = sr[c] == kNegInf ? 0.0f : ExpNonPositive(sr[c] - mx);
          sr[c] = p;
          sum += p;
        }
        std::fill(sr + visible, sr + sk, 0.0f);
        l[r] = l[r] * alpha + sum;
        m[r] = mx;
        float* ar = acc.data() + r * h;
        for (int64_t x = 0; x < h; ++x) ar[x] *= alpha;
      }
      Gemm(false, false, rows, h, sk, s.data(), sk, vb, ld_kv, acc.data(), h, 1.0f);
    }
    for (int64_t t = 0; t < tq; ++t)
      for (int64_t j = 0; j < g; ++j) {
        const int64_t r = t * g + j;
        const float inv = 1.0f / l[r];
        float* dst = op + ((row * t_len + t0 + t) * n_heads + head * g + j) * h;
        const float* src = acc.data() + r * h;
        for (int64_t x = 0; x < h; ++x) dst[x] = src[x] * inv;
      }
  };
  ParallelFor(pool, batch * kv_heads * q_blocks, task);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeditronCpuCausalAttention, CpuCausalAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
