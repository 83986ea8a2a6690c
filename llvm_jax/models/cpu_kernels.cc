// C++ kernels for XLA:CPU, called through jax.ffi by llvm_jax/models/cpu_kernels.py: FlashAttention
// (attention_impl="cpu_flash"), the weight gradient of dense layers (dense_impl="cpu") and a copy.
//
// FlashAttention-2's recipe on a CPU: one task per (batch row, KV head) copies that head's K and V, and
// the rows of its query heads, into zero-padded buffers that stay in L1/L2 (one streaming pass each),
// and walks the query rows four at a time (register tiles of 4 rows x 2 vectors), so the (T, S) logits
// never exist beyond those rows; the backward pass recomputes the probabilities from the saved
// log-sum-exp. The mask is the factored MaskInfo of llvm_jax/models/masks.py: query t sees key s iff
//   q_seg[t] == kv_seg[s] != 0 and kv_slot[s] <= q_slot[t] [and q_pos[t] - kv_pos[s] < window].
// A row with no visible key outputs 0, has log-sum-exp +inf and passes no gradient.
//
// Vectors are GCC/Clang vector extensions of 8 floats (one AVX register, two SSE or NEON ones): the
// compiler maps them onto the build machine's SIMD unit. Feature widths are zero-padded to W
// vectors, W a compile-time constant, so the per-key loops keep their accumulators in registers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr float kInf = std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }
inline f8 load(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
inline i8 load_i(const int32_t* p) {
  i8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }
inline float hsum(f8 v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(f8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) for x in [-87, 0] (inputs are clamped there): 2^k times a degree-6 Taylor polynomial of
// r = x - k ln2 in [-ln2/2, ln2/2]; relative error below 2e-7.
inline f8 exp8(f8 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 0.0f ? splat(0.0f) : x;
  const f8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f8 k = (x * 1.44269504088896341f + magic) - magic;
  const f8 r = x - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
  f8 p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i8 bits = (__builtin_convertvector(k, i8) + 127) << 23;
  return p * reinterpret_cast<f8&>(bits);
}

struct Dims {
  int64_t b, t, s, h, hkv, dq, dv;
  int64_t groups() const { return h / hkv; }
  int64_t sp() const { return round_up(s, 2 * kLanes); }  // keys, padded to whole key blocks
};

struct Mask {
  const int32_t *q_seg, *q_slot, *q_pos, *kv_seg, *kv_slot, *kv_pos;
  int32_t window;  // INT32_MAX: no sliding window
};

// Runs fn(task) for task in [0, n) on the caller and the XLA:CPU intra-op pool. Tasks are claimed
// from a shared counter, so the caller never waits for a task that nobody has started.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  const int64_t workers = std::min<int64_t>(pool.num_threads(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

constexpr int64_t kKeyBlock = 2 * kLanes;  // keys per step of the block kernels
constexpr int64_t kRows = 4;               // query rows per block: each key vector loaded feeds kRows FMAs

inline bool any(i8 ok) {
#if defined(__AVX__)
  return _mm256_movemask_ps(reinterpret_cast<__m256&>(ok)) != 0;
#else
  bool seen = false;
  for (int i = 0; i < kLanes; ++i) seen |= ok[i] != 0;
  return seen;
#endif
}

// One task's head, features padded to W vectors: K transposed (width, sp) and row-major (sp, width),
// V transposed and row-major alike, and the batch row's key mask vectors (padding keys get segment
// -1, which no query has).
template <int W>
struct Head {
  static constexpr int64_t width = W * kLanes;
  std::vector<float> k_t, k_rows, v_t, v_rows;
  std::vector<int32_t> seg, slot, pos;

  void load(const Dims& d, const Mask& m, const float* k, const float* v, int64_t b, int64_t kvh, bool backward) {
    const int64_t sp = d.sp();
    k_t.assign(width * sp, 0.0f);
    v_rows.assign(sp * width, 0.0f);
    if (backward) {
      k_rows.assign(sp * width, 0.0f);
      v_t.assign(width * sp, 0.0f);
    }
    for (int64_t s = 0; s < d.s; ++s) {
      const float* ks = k + ((b * d.s + s) * d.hkv + kvh) * d.dq;
      const float* vs = v + ((b * d.s + s) * d.hkv + kvh) * d.dv;
      for (int64_t i = 0; i < d.dq; ++i) k_t[i * sp + s] = ks[i];
      std::copy(vs, vs + d.dv, v_rows.begin() + s * width);
      if (backward) {
        std::copy(ks, ks + d.dq, k_rows.begin() + s * width);
        for (int64_t e = 0; e < d.dv; ++e) v_t[e * sp + s] = vs[e];
      }
    }
    seg.assign(sp, -1);
    slot.assign(sp, 0);
    pos.assign(sp, 0);
    std::copy(m.kv_seg + b * d.s, m.kv_seg + (b + 1) * d.s, seg.begin());
    std::copy(m.kv_slot + b * d.s, m.kv_slot + (b + 1) * d.s, slot.begin());
    std::copy(m.kv_pos + b * d.s, m.kv_pos + (b + 1) * d.s, pos.begin());
  }

  // The masks of query rows [t0, t0 + kRows) of batch row b: allowed[r * sp + s] = 1 where row r sees
  // key s, else 0 (rows past T see nothing). Returns the keys [lo, hi), in whole key blocks, that hold
  // every visible one (the loops skip the rest: for a causal mask, the future; lo == hi: none), and
  // sets visible[r].
  std::pair<int64_t, int64_t> mask_rows(const Dims& d, const Mask& m, int64_t b, int64_t t0, float* allowed,
                                        bool* visible) const {
    const int64_t sp = d.sp();
    int64_t lo = sp, hi = 0;
    for (int64_t r = 0; r < kRows; ++r) {
      float* row = allowed + r * sp;
      visible[r] = false;
      const int64_t t = t0 + r;
      const int32_t qseg = t < d.t ? m.q_seg[b * d.t + t] : 0;
      if (qseg == 0) {
        std::fill(row, row + sp, 0.0f);
        continue;
      }
      const int32_t qslot = m.q_slot[b * d.t + t], qpos = m.q_pos[b * d.t + t];
      for (int64_t s = 0; s < sp; s += kLanes) {
        const i8 ok = (load_i(&seg[s]) == qseg) & (load_i(&slot[s]) <= qslot) & ((qpos - load_i(&pos[s])) < m.window);
        store(row + s, __builtin_convertvector(ok & 1, f8));
        if (any(ok)) {
          visible[r] = true;
          lo = std::min(lo, s / kKeyBlock * kKeyBlock);
          hi = std::max(hi, (s / kKeyBlock + 1) * kKeyBlock);
        }
      }
    }
    return {std::min(lo, hi), hi};
  }
};

// out[r * sp + s] = rows[r] . cols[:, s] for the block's kRows rows (rows (kRows, width)) and s in
// [lo, hi), cols (width, sp): a register tile of kRows x 2 vectors.
template <int W>
inline void block_times(const float* rows, const float* cols, int64_t sp, int64_t lo, int64_t hi, float* out) {
  constexpr int64_t width = W * kLanes;
  for (int64_t s = lo; s < hi; s += kKeyBlock) {
    f8 acc[kRows][2] = {};
    for (int64_t i = 0; i < width; ++i) {
      const f8 c0 = load(cols + i * sp + s), c1 = load(cols + i * sp + s + kLanes);
      for (int r = 0; r < kRows; ++r) {
        const float x = rows[r * width + i];
        acc[r][0] += x * c0;
        acc[r][1] += x * c1;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      store(out + r * sp + s, acc[r][0]);
      store(out + r * sp + s + kLanes, acc[r][1]);
    }
  }
}

// out[r] = sum over s in [lo, hi) of w[r * sp + s] * mat[s, :] for the block's rows, mat (sp, width):
// register tiles of kRows x (up to) 2 vectors.
template <int W>
inline void block_weighted(const float* w, const float* mat, int64_t sp, int64_t lo, int64_t hi, float* out) {
  constexpr int64_t width = W * kLanes;
  constexpr int G = W < 2 ? W : 2;
  for (int c0 = 0; c0 < W; c0 += G) {
    f8 acc[kRows][G] = {};
    for (int64_t s = lo; s < hi; ++s) {
      f8 col[G];
      for (int g = 0; g < G; ++g) col[g] = load(mat + s * width + (c0 + g) * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const float x = w[r * sp + s];
        for (int g = 0; g < G; ++g) acc[r][g] += x * col[g];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int g = 0; g < G; ++g) store(out + r * width + (c0 + g) * kLanes, acc[r][g]);
  }
}

// acc[s, :] += sum_r w[r * sp + s] * rows[r, :] for s in [lo, hi) (rows (kRows, width), acc (sp, width)):
// each chunk of the rows stays in registers while the keys stream past.
template <int W>
inline void block_accumulate(const float* w, const float* rows, int64_t sp, int64_t lo, int64_t hi, float* acc) {
  constexpr int64_t width = W * kLanes;
  constexpr int G = W < 2 ? W : 2;
  for (int c0 = 0; c0 < W; c0 += G) {
    f8 row[kRows][G];
    for (int r = 0; r < kRows; ++r)
      for (int g = 0; g < G; ++g) row[r][g] = load(rows + r * width + (c0 + g) * kLanes);
    for (int64_t s = lo; s < hi; ++s) {
      f8 a[G];
      for (int g = 0; g < G; ++g) a[g] = load(acc + s * width + (c0 + g) * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const float x = w[r * sp + s];
        for (int g = 0; g < G; ++g) a[g] += x * row[r][g];
      }
      for (int g = 0; g < G; ++g) store(acc + s * width + (c0 + g) * kLanes, a[g]);
    }
  }
}

// A task's rows of x (B, T, H, dim) for its query heads [kvh * G, (kvh + 1) * G), times `scale`, into
// rows (G, tp, width), which the caller has zeroed.
template <int W>
void gather_rows(const Dims& d, const float* x, int64_t dim, int64_t b, int64_t kvh, float scale, float* rows) {
  constexpr int64_t width = W * kLanes;
  const int64_t groups = d.groups(), tp = round_up(d.t, kRows);
  for (int64_t t = 0; t < d.t; ++t) {
    const float* src = x + ((b * d.t + t) * d.h + kvh * groups) * dim;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < dim; ++i) rows[(g * tp + t) * width + i] = src[g * dim + i] * scale;
  }
}

// The inverse of gather_rows (no scale): rows (G, tp, width) back into x (B, T, H, dim).
template <int W>
void scatter_rows(const Dims& d, const float* rows, int64_t dim, int64_t b, int64_t kvh, float* x) {
  constexpr int64_t width = W * kLanes;
  const int64_t groups = d.groups(), tp = round_up(d.t, kRows);
  for (int64_t t = 0; t < d.t; ++t)
    for (int64_t g = 0; g < groups; ++g)
      std::memcpy(x + ((b * d.t + t) * d.h + kvh * groups + g) * dim, rows + (g * tp + t) * width, dim * sizeof(float));
}

// The block's kRows rows of a gathered head (rows (kRows, width)) with the rows that see no key (padding
// queries, rows past T) zeroed: `rows` itself when every row sees a key, else a copy in `scratch`.
template <int W>
inline const float* visible_rows(const float* rows, const bool* visible, float* scratch) {
  constexpr int64_t width = W * kLanes;
  if (std::all_of(visible, visible + kRows, [](bool v) { return v; })) return rows;
  for (int64_t r = 0; r < kRows; ++r)
    for (int c = 0; c < W; ++c)
      store(scratch + r * width + c * kLanes, visible[r] ? load(rows + r * width + c * kLanes) : splat(0.0f));
  return scratch;
}

template <int W>
void forward(ffi::ThreadPool& pool, const Dims d, const Mask m, const float* qp, const float* kp, const float* vp,
             float scale, float* op, float* lp) {
  parallel_for(pool, d.b * d.hkv, [=](int64_t task) {
    const int64_t b = task / d.hkv, kvh = task % d.hkv, sp = d.sp(), width = W * kLanes;
    const int64_t groups = d.groups(), tp = round_up(d.t, kRows);
    thread_local Head<W> head;
    thread_local std::vector<float> buf, q_all, o_all;
    head.load(d, m, kp, vp, b, kvh, false);
    q_all.assign(groups * tp * width, 0.0f);
    o_all.assign(groups * tp * width, 0.0f);
    gather_rows<W>(d, qp, d.dq, b, kvh, scale, q_all.data());
    buf.assign(kRows * (2 * sp + 2 * width), 0.0f);
    float *p = buf.data(), *allowed = p + kRows * sp;  // (kRows, sp) each
    float *q_scratch = allowed + kRows * sp, *o_rows = q_scratch + kRows * width;
    bool visible[kRows];
    for (int64_t t0 = 0; t0 < d.t; t0 += kRows) {
      const auto [lo, hi] = head.mask_rows(d, m, b, t0, allowed, visible);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h = kvh * groups + g;
        const float* q_rows = visible_rows<W>(q_all.data() + (g * tp + t0) * width, visible, q_scratch);
        block_times<W>(q_rows, head.k_t.data(), sp, lo, hi, p);
        float sums[kRows], maxes[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          float *p_r = p + r * sp, *a_r = allowed + r * sp;
          f8 max8 = splat(-kInf);
          for (int64_t s = lo; s < hi; s += kLanes) {
            const f8 l = load(p_r + s);
            max8 = load(a_r + s) > 0.0f ? (l > max8 ? l : max8) : max8;
          }
          maxes[r] = visible[r] ? hmax(max8) : 0.0f;
          f8 sum8 = splat(0.0f);
          for (int64_t s = lo; s < hi; s += kLanes) {
            const f8 e = exp8(load(p_r + s) - maxes[r]) * load(a_r + s);
            store(p_r + s, e);
            sum8 += e;
          }
          sums[r] = hsum(sum8);
        }
        block_weighted<W>(p, head.v_rows.data(), sp, lo, hi, o_rows);
        for (int64_t r = 0; r < kRows && t0 + r < d.t; ++r) {
          const int64_t t = t0 + r;
          const f8 inv = splat(visible[r] ? 1.0f / sums[r] : 0.0f);
          for (int c = 0; c < W; ++c)
            store(o_all.data() + (g * tp + t) * width + c * kLanes, load(o_rows + r * width + c * kLanes) * inv);
          lp[(b * d.h + h) * d.t + t] = visible[r] ? maxes[r] + std::log(sums[r]) : kInf;
        }
      }
    }
    scatter_rows<W>(d, o_all.data(), d.dv, b, kvh, op);
  });
}

template <int W>
void backward(ffi::ThreadPool& pool, const Dims d, const Mask m, const float* qp, const float* kp, const float* vp,
              const float* op, const float* lp, const float* dop, float scale, float* dq_out, float* dk_out,
              float* dv_out) {
  parallel_for(pool, d.b * d.hkv, [=](int64_t task) {
    const int64_t b = task / d.hkv, kvh = task % d.hkv, sp = d.sp(), width = W * kLanes;
    const int64_t groups = d.groups(), tp = round_up(d.t, kRows);
    thread_local Head<W> head;
    thread_local std::vector<float> buf, q_all, do_all, dq_all, delta_all;
    head.load(d, m, kp, vp, b, kvh, true);
    for (auto* rows : {&q_all, &do_all, &dq_all}) rows->assign(groups * tp * width, 0.0f);
    gather_rows<W>(d, qp, d.dq, b, kvh, scale, q_all.data());
    gather_rows<W>(d, dop, d.dv, b, kvh, 1.0f, do_all.data());
    // delta = rowsum(dO * O), gathered the same way.
    delta_all.assign(groups * tp, 0.0f);
    for (int64_t t = 0; t < d.t; ++t)
      for (int64_t g = 0; g < groups; ++g) {
        const float* o_row = op + ((b * d.t + t) * d.h + kvh * groups + g) * d.dv;
        const float* do_row = do_all.data() + (g * tp + t) * width;
        float delta = 0.0f;
        for (int64_t e = 0; e < d.dv; ++e) delta += do_row[e] * o_row[e];
        delta_all[g * tp + t] = delta;
      }
    buf.assign(2 * sp * width + kRows * (3 * sp + 2 * width), 0.0f);
    float *dk_acc = buf.data(), *dv_acc = dk_acc + sp * width;
    float *p = dv_acc + sp * width, *ds = p + kRows * sp, *allowed = ds + kRows * sp;  // (kRows, sp) each
    float *q_scratch = allowed + kRows * sp, *do_scratch = q_scratch + kRows * width;
    bool visible[kRows];
    for (int64_t t0 = 0; t0 < d.t; t0 += kRows) {
      const auto [lo, hi] = head.mask_rows(d, m, b, t0, allowed, visible);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h = kvh * groups + g;
        const float* q_rows = visible_rows<W>(q_all.data() + (g * tp + t0) * width, visible, q_scratch);
        const float* do_rows = visible_rows<W>(do_all.data() + (g * tp + t0) * width, visible, do_scratch);
        float deltas[kRows], lses[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          deltas[r] = visible[r] ? delta_all[g * tp + t0 + r] : 0.0f;
          lses[r] = visible[r] ? lp[(b * d.h + h) * d.t + t0 + r] : 0.0f;
        }
        block_times<W>(q_rows, head.k_t.data(), sp, lo, hi, p);
        block_times<W>(do_rows, head.v_t.data(), sp, lo, hi, ds);  // dP = dO V^T
        for (int64_t r = 0; r < kRows; ++r) {
          float *p_r = p + r * sp, *ds_r = ds + r * sp, *a_r = allowed + r * sp;
          for (int64_t s = lo; s < hi; s += kLanes) {
            const f8 pv = exp8(load(p_r + s) - lses[r]) * load(a_r + s);  // rows seeing nothing: allowed is 0
            store(p_r + s, pv);
            store(ds_r + s, pv * (load(ds_r + s) - deltas[r]));
          }
        }
        block_weighted<W>(ds, head.k_rows.data(), sp, lo, hi, dq_all.data() + (g * tp + t0) * width);
        // dK[s] += sum_r dS[r, s] q_r and dV[s] += sum_r P[r, s] dO_r (q_r already carries the scale).
        block_accumulate<W>(ds, q_rows, sp, lo, hi, dk_acc);
        block_accumulate<W>(p, do_rows, sp, lo, hi, dv_acc);
      }
    }
    for (float& x : dq_all) x *= scale;
    scatter_rows<W>(d, dq_all.data(), d.dq, b, kvh, dq_out);
    for (int64_t s = 0; s < d.s; ++s) {
      std::memcpy(dk_out + ((b * d.s + s) * d.hkv + kvh) * d.dq, dk_acc + s * width, d.dq * sizeof(float));
      std::memcpy(dv_out + ((b * d.s + s) * d.hkv + kvh) * d.dv, dv_acc + s * width, d.dv * sizeof(float));
    }
  });
}

// Checks the head counts, then calls fn.template operator()<W>() with W the smallest supported vector
// count that holds both feature widths.
template <typename Fn>
ffi::Error with_width(const Dims& d, Fn&& fn) {
  if (d.hkv <= 0 || d.h % d.hkv) return ffi::Error::InvalidArgument("query heads must be a multiple of KV heads");
  const int64_t vectors = round_up(std::max(d.dq, d.dv), kLanes) / kLanes;
  if (vectors <= 1) return fn.template operator()<1>();
  if (vectors <= 2) return fn.template operator()<2>();
  if (vectors <= 4) return fn.template operator()<4>();
  if (vectors <= 8) return fn.template operator()<8>();
  if (vectors <= 16) return fn.template operator()<16>();
  if (vectors <= 32) return fn.template operator()<32>();
  return ffi::Error::InvalidArgument("cpu attention supports head dimensions up to 256");
}

Dims dims_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  return Dims{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], vd[3]};
}

Mask mask_of(const ffi::Buffer<ffi::S32>& q_seg, const ffi::Buffer<ffi::S32>& q_slot, const ffi::Buffer<ffi::S32>& q_pos,
             const ffi::Buffer<ffi::S32>& kv_seg, const ffi::Buffer<ffi::S32>& kv_slot,
             const ffi::Buffer<ffi::S32>& kv_pos, int64_t window) {
  const int32_t w = window > 0 ? static_cast<int32_t>(std::min<int64_t>(window, INT32_MAX)) : INT32_MAX;
  return Mask{q_seg.typed_data(),  q_slot.typed_data(),  q_pos.typed_data(), kv_seg.typed_data(),
              kv_slot.typed_data(), kv_pos.typed_data(), w};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> q_slot, ffi::Buffer<ffi::S32> q_pos,
                   ffi::Buffer<ffi::S32> kv_seg, ffi::Buffer<ffi::S32> kv_slot, ffi::Buffer<ffi::S32> kv_pos,
                   float scale, int64_t window, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const Dims d = dims_of(q, k, v);
  const Mask m = mask_of(q_seg, q_slot, q_pos, kv_seg, kv_slot, kv_pos, window);
  return with_width(d, [&]<int W>() {
    forward<W>(pool, d, m, q.typed_data(), k.typed_data(), v.typed_data(), scale, out->typed_data(),
               lse->typed_data());
    return ffi::Error::Success();
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> q_slot, ffi::Buffer<ffi::S32> q_pos,
                    ffi::Buffer<ffi::S32> kv_seg, ffi::Buffer<ffi::S32> kv_slot, ffi::Buffer<ffi::S32> kv_pos,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out, float scale,
                    int64_t window, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = dims_of(q, k, v);
  const Mask m = mask_of(q_seg, q_slot, q_pos, kv_seg, kv_slot, kv_pos, window);
  return with_width(d, [&]<int W>() {
    backward<W>(pool, d, m, q.typed_data(), k.typed_data(), v.typed_data(), out.typed_data(), lse.typed_data(),
                d_out.typed_data(), scale, dq->typed_data(), dk->typed_data(), dv->typed_data());
    return ffi::Error::Success();
  });
}

// dW = x^T dy, the weight gradient of a dense layer y = x W: x (M, K), dy (M, N), dW (K, N). XLA:CPU runs
// this transposed-operand product single-threaded, at a third of the machine's FLOP/s for the short K and N
// of small models. Here the M rows are split between the threads, each accumulates a partial dW in
// register tiles of 6 (or 4, 2) rows of K by 2 vectors of N, sweeping its rows in cache-sized chunks, and
// the partials are summed at the end.
constexpr int64_t kGradTileN = 2 * kLanes;  // columns of dW per register tile
constexpr int64_t kGradChunk = 64;          // rows of x and dy per sweep (they stay in L1/L2)

// acc[k0 : k0 + TK, :np] += xs[:, k0 : k0 + TK]^T ys[:, :np] over `rows` rows.
template <int TK>
inline void grad_tile_rows(const float* xs, int64_t ldx, const float* ys, int64_t ldy, int64_t rows, int64_t k0,
                           int64_t np, float* acc) {
  for (int64_t n0 = 0; n0 < np; n0 += kGradTileN) {
    f8 a[TK][2];
    for (int i = 0; i < TK; ++i) {
      a[i][0] = load(acc + (k0 + i) * np + n0);
      a[i][1] = load(acc + (k0 + i) * np + n0 + kLanes);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const f8 y0 = load(ys + r * ldy + n0), y1 = load(ys + r * ldy + n0 + kLanes);
      for (int i = 0; i < TK; ++i) {
        const float xv = xs[r * ldx + k0 + i];
        a[i][0] += xv * y0;
        a[i][1] += xv * y1;
      }
    }
    for (int i = 0; i < TK; ++i) {
      store(acc + (k0 + i) * np + n0, a[i][0]);
      store(acc + (k0 + i) * np + n0 + kLanes, a[i][1]);
    }
  }
}

// acc (kp, np) += xs (rows, ldx)^T ys (rows, ldy), kp even and np a multiple of kGradTileN.
void grad_accumulate(const float* xs, int64_t ldx, const float* ys, int64_t ldy, int64_t rows, int64_t kp,
                     int64_t np, float* acc) {
  int64_t k0 = 0;
  for (; k0 + 6 <= kp; k0 += 6) grad_tile_rows<6>(xs, ldx, ys, ldy, rows, k0, np, acc);
  if (kp - k0 == 4) grad_tile_rows<4>(xs, ldx, ys, ldy, rows, k0, np, acc);
  if (kp - k0 == 2) grad_tile_rows<2>(xs, ldx, ys, ldy, rows, k0, np, acc);
}

ffi::Error DenseWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw) {
  if (x.dimensions().size() != 2 || dy.dimensions().size() != 2 || x.dimensions()[0] != dy.dimensions()[0])
    return ffi::Error::InvalidArgument("dense weight gradient: x (M, K) and dy (M, N) must share M");
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = dy.dimensions()[1];
  // Whole tiles: K padded to even, N to kGradTileN; a chunk of x or dy whose rows are not whole tiles is
  // copied into a zero-padded buffer first.
  const int64_t kp = round_up(k, 2), np = round_up(n, kGradTileN);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), m / kGradChunk));
  std::vector<float> partial(parts * kp * np, 0.0f);
  parallel_for(pool, parts, [&](int64_t part) {
    const int64_t m0 = m * part / parts, m1 = m * (part + 1) / parts;
    float* acc = partial.data() + part * kp * np;
    thread_local std::vector<float> x_chunk, y_chunk;
    // (rows, width) of `src` from row c on, padded to `padded` columns where width is not.
    auto rows_of = [](const float* src, int64_t width, int64_t padded, int64_t c, int64_t rows,
                      std::vector<float>& chunk) -> const float* {
      if (padded == width) return src + c * width;
      chunk.assign(rows * padded, 0.0f);
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(chunk.data() + r * padded, src + (c + r) * width, width * sizeof(float));
      return chunk.data();
    };
    for (int64_t c = m0; c < m1; c += kGradChunk) {
      const int64_t rows = std::min(kGradChunk, m1 - c);
      const float* xs = rows_of(x.typed_data(), k, kp, c, rows, x_chunk);
      const float* ys = rows_of(dy.typed_data(), n, np, c, rows, y_chunk);
      grad_accumulate(xs, kp, ys, np, rows, kp, np, acc);
    }
  });
  float* out = dw->typed_data();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t part = 0; part < parts; ++part) sum += partial[(part * kp + i) * np + j];
      out[i * n + j] = sum;
    }
  return ffi::Error::Success();
}

// A copy of x into a buffer of its own: XLA:CPU reads an FFI call's result where it would otherwise fuse
// an elementwise producer (RoPE's cos and sin) into each of its consumers and recompute it there.
ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlvmJaxCpuMaterialize, Materialize,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlvmJaxCpuDenseWeightGrad, DenseWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (M, K)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy (M, N)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dW (K, N)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlvmJaxCpuAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q (B, T, H, dq)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k (B, S, Hkv, dq)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v (B, S, Hkv, dv)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q segment ids (B, T)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv segment ids (B, S)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv positions
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out (B, T, H, dv)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // log-sum-exp (B, H, T)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlvmJaxCpuAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q segment ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv segment ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv positions
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d out
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d q
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d k
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d v
