// Fused softmax attention for XLA:CPU, called through the XLA FFI.
//
// Why: on CPU, XLA runs attention as separate batched dots of width d = 64 with the
// score matrix going through memory between them (~29% of the matmul peak). Here
// each (example, head) slice is one task: its score matrix stays in a thread-local
// buffer that fits in L2, the five products are OpenBLAS sgemm calls that read the
// (batch, tokens, heads, dim) layout in place through their leading dimension (no
// transposes), and the backward recomputes the probabilities from the saved
// log-sum-exp (flash attention's backward).  Math: S = scale * Q K^T,
// P = softmax(S), O = P V; dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
// dQ = scale * dS K, dK = scale * dS^T Q.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Array = ffi::Buffer<ffi::F32>;
using Result = ffi::ResultBuffer<ffi::F32>;

namespace {

struct Shape {
  int64_t batch, queries, keys, heads, dim;
  int64_t q_row() const { return heads * dim; }  // Stride between tokens.
  int64_t slices() const { return batch * heads; }
};

// One slice's views into (batch, tokens, heads, dim) arrays.
struct Slice {
  int64_t b, h;
  int64_t q_offset(const Shape& s) const { return b * s.queries * s.q_row() + h * s.dim; }
  int64_t k_offset(const Shape& s) const { return b * s.keys * s.q_row() + h * s.dim; }
  int64_t lse_offset(const Shape& s) const { return (b * s.heads + h) * s.queries; }
};

std::vector<float>& scratch(int which, size_t size) {
  thread_local std::vector<float> buffers[2];
  if (buffers[which].size() < size) buffers[which].resize(size);
  return buffers[which];
}

// scores = scale * Q K^T for one slice, (queries, keys) row-major.
void scores(const Shape& s, const float* q, const float* k, float scale, float* out) {
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.queries, s.keys, s.dim,
                    scale, q, s.q_row(), k, s.q_row(), 0.f, out, s.keys);
}

void forward_slice(const Shape& s, Slice sl, const float* q, const float* k,
                   const float* v, float* out, float* lse) {
  const int64_t n = s.queries, m = s.keys;
  float* p = scratch(0, n * m).data();
  scores(s, q + sl.q_offset(s), k + sl.k_offset(s), 1.f / std::sqrt(float(s.dim)), p);
  float* row_lse = lse + sl.lse_offset(s);
  for (int64_t i = 0; i < n; ++i) {
    float* row = p + i * m;
    float top = row[0];
    for (int64_t j = 1; j < m; ++j) top = std::max(top, row[j]);
    float total = 0.f;
    for (int64_t j = 0; j < m; ++j) {
      row[j] = std::exp(row[j] - top);
      total += row[j];
    }
    const float inv = 1.f / total;
    for (int64_t j = 0; j < m; ++j) row[j] *= inv;
    row_lse[i] = top + std::log(total);
  }
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, s.dim, m, 1.f, p, m,
                    v + sl.k_offset(s), s.q_row(), 0.f, out + sl.q_offset(s), s.q_row());
}

void backward_slice(const Shape& s, Slice sl, const float* q, const float* k,
                    const float* v, const float* out, const float* lse,
                    const float* d_out, float* d_q, float* d_k, float* d_v) {
  const int64_t n = s.queries, m = s.keys, ld = s.q_row();
  const float scale = 1.f / std::sqrt(float(s.dim));
  const int64_t qo = sl.q_offset(s), ko = sl.k_offset(s);
  float* p = scratch(0, n * m).data();
  float* dp = scratch(1, n * m).data();
  scores(s, q + qo, k + ko, scale, p);
  const float* row_lse = lse + sl.lse_offset(s);
  for (int64_t i = 0; i < n; ++i) {
    float* row = p + i * m;
    const float shift = row_lse[i];
    for (int64_t j = 0; j < m; ++j) row[j] = std::exp(row[j] - shift);
  }
  // dV = P^T dO.
  scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, s.dim, n, 1.f, p, m,
                    d_out + qo, ld, 0.f, d_v + ko, ld);
  // dP = dO V^T, then dS = P * (dP - rowsum(dO * O)) in place.
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, s.dim, 1.f, d_out + qo,
                    ld, v + ko, ld, 0.f, dp, m);
  for (int64_t i = 0; i < n; ++i) {
    const float* o_row = out + qo + i * ld;
    const float* do_row = d_out + qo + i * ld;
    float dot = 0.f;
    for (int64_t c = 0; c < s.dim; ++c) dot += o_row[c] * do_row[c];
    float* ds_row = dp + i * m;
    const float* p_row = p + i * m;
    for (int64_t j = 0; j < m; ++j) ds_row[j] = p_row[j] * (ds_row[j] - dot);
  }
  // dQ = scale * dS K, dK = scale * dS^T Q.
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, s.dim, m, scale, dp, m,
                    k + ko, ld, 0.f, d_q + qo, ld);
  scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, s.dim, n, scale, dp, m,
                    q + qo, ld, 0.f, d_k + ko, ld);
}

// Runs work(slice) for every slice on the calling thread and up to the pool's other
// threads. Slices are claimed from a shared counter, so the caller never waits for
// a task that has not started (the pool may be busy): it finishes the rest itself.
template <typename Work>
void for_each_slice(ffi::ThreadPool& pool, const Shape& s, Work work) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const int64_t total = s.slices();
  auto run = [state, total, s, work]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < total;) {
      work(Slice{i / s.heads, i % s.heads});
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

Shape shape_of(const Array& q, const Array& k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], qd[3]};
}

ffi::Error Forward(ffi::ThreadPool pool, Array q, Array k, Array v, Result out, Result lse) {
  if (q.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("attention expects (batch, tokens, heads, dim) inputs");
  }
  const Shape s = shape_of(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  for_each_slice(pool, s, [=](Slice sl) { forward_slice(s, sl, qp, kp, vp, op, lp); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, Array q, Array k, Array v, Array out, Array lse,
                    Array d_out, Result d_q, Result d_k, Result d_v) {
  if (q.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("attention expects (batch, tokens, heads, dim) inputs");
  }
  const Shape s = shape_of(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *dop = d_out.typed_data();
  float *dq = d_q->typed_data(), *dk = d_k->typed_data(), *dv = d_v->typed_data();
  for_each_slice(pool, s, [=](Slice sl) {
    backward_slice(s, sl, qp, kp, vp, op, lp, dop, dq, dk, dv);
  });
  return ffi::Error::Success();
}

}  // namespace

// Forward(q, k, v) -> (out, lse); Backward(q, k, v, out, lse, d_out) -> (d_q, d_k, d_v).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlexiAttentionForward, Forward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Array>().Arg<Array>().Arg<Array>()
        .Ret<Array>().Ret<Array>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlexiAttentionBackward, Backward,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Array>().Arg<Array>().Arg<Array>()
        .Arg<Array>().Arg<Array>().Arg<Array>().Ret<Array>().Ret<Array>().Ret<Array>());

extern "C" void flexi_attention_blas_threads(int n) { scipy_openblas_set_num_threads(n); }
extern "C" const char* flexi_attention_blas_core() { return scipy_openblas_get_corename(); }
