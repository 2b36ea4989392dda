// Float32 GEMM for XLA:CPU through the XLA FFI, computed by a host BLAS (oneMKL).
//
// meditron_jax/cpu_gemm.py compiles this file once per jaxlib version, hands it the
// BLAS's cblas_sgemm (ILP64) and registers the handler as the custom call target
// "meditron_cpu_gemm". oneMKL runs its sequential layer: the handler cuts C (or a batch
// of products: attention's heads) into tiles computed on XLA's own intra-op thread
// pool, so no second thread pool competes with XLA's for the cores. (oneMKL's GNU
// OpenMP layer, one threaded call per product, measured the same in the model's
// forward and training step; bench/NOTES.md.)
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
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

// C[m, n] (leading dimension ldc) = op(A) @ op(B) for one tile.
void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  g_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f, a, lda, b,
          ldb, 0.0f, c, ldc);
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
  const int64_t tiles = batch * cuts;
  const int64_t helpers = std::min(threads, tiles) - 1;
  if (helpers == 0) {
    for (int64_t i = 0; i < tiles; ++i) tile(i);
    return ffi::Error::Success();
  }

  auto job = std::make_shared<Job>();
  job->tiles = tiles;
  auto work = [job, tile]() {
    for (int64_t i; (i = job->next.fetch_add(1)) < job->tiles;) {
      tile(i);
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
