// Fused CPU kernels (posttrain/models/cpu_kernels.py says why and how they are built). Each does in
// one pass what PyTorch does in several ops.
//
// Training (forward and backward of `posttrain.models.fused_ops`):
//   rms_norm_fwd / rms_norm_bwd   HF's Llama-family RMSNorm, its output in a chosen dtype
//   silu_mul_fwd / silu_mul_bwd   silu(gate) * up of two tensors
//
// Decode (`posttrain.rollout.fused`):
//   add_rms_norm_   x += delta (rounded to x's dtype), then RMSNorm(x) * weight
//   silu_mul        silu(gate) * up from the fused gate/up projection
//   rope_kv_        RoPE of q and k (fp32), k and v written into the reserved cache's column,
//                   q scaled and returned in fp32
//   decode_attention  one query token per row over the row's cached keys / values: each key and
//                   value row is read once for all query heads of its key/value head
//   sample_softmax  one token per row drawn from softmax(logits) by a given uniform (two-level
//                   inverse CDF, as `hf_engine.draw`), and its log-prob, without writing the probs
//
// Arithmetic is fp32 whatever the storage dtype (fp32 or bf16), as in the PyTorch path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 1 << 15;  // below this much work a kernel stays on one thread

// Storage types: float, or bf16 as its raw 16 bits (uint16_t). Plain bit operations, so that the
// loops over them vectorize (uint16_t's conversions did not).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(p[i]) << 16);
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {  // round to nearest even, as Tensor.to does
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  p[i] = v != v ? static_cast<uint16_t>(0x7FC0) : rounded;  // NaN stays NaN
}

template <typename T>
T* ptr(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
constexpr bool is_bf16() {
  return std::is_same_v<T, uint16_t>;
}

// exp(x) for x <= 88, 2^n * P(r) with n = round(x / ln 2), |r| <= ln 2 / 2 (Cephes' expf
// polynomial, ~1 ulp): branch-free, so the loops that call it vectorize (std::exp does not, and was
// most of attention's and SiLU's time). Below -87.3 it returns ~2^-126 * P, which the callers treat
// as 0 next to their other terms (softmax: the max term is 1).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float shifted = x * 1.44269504088896341f + 12582912.f;  // 1.5 * 2^23: rounds to an integer
  const float n = shifted - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t k = __builtin_bit_cast(int32_t, shifted) - 0x4B400000;  // n as an integer
  return p * __builtin_bit_cast(float, (k + 127) << 23);
}

int64_t grain(int64_t items, int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item));
}

// 1 / sqrt(mean(x^2) + eps) of one row of n values.
template <typename T>
inline float row_rstd(const T* xr, int64_t n, double eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const float v = load(xr, i);
    ss += v * v;
  }
  return 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

template <typename T>
void add_rms_norm_impl(torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const torch::Tensor& w,
                       torch::Tensor& out, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  T* xp = ptr<T>(x);
  const T* dp = delta.has_value() ? ptr<T>(*delta) : nullptr;
  const T* wp = ptr<T>(w);
  T* op = ptr<T>(out);
  at::parallel_for(0, rows, grain(rows, n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = xp + r * n;
      T* orow = op + r * n;
      if (dp != nullptr) {
        const T* dr = dp + r * n;
        for (int64_t i = 0; i < n; ++i) {
          store(xr, i, load(xr, i) + load(dr, i));  // the residual stream keeps x's dtype
        }
      }
      const float rstd = row_rstd(xr, n, eps);
      for (int64_t i = 0; i < n; ++i) {
        store(orow, i, load(xr, i) * rstd * load(wp, i));
      }
    }
  });
}

// out[r] = silu(gate[r]) * up[r] over rows of `inner` values; each operand has its own row stride
// (the decode step's fused gate/up projection: gate and up halves of one row).
template <typename T>
void silu_mul_rows(const T* gp, int64_t g_stride, const T* up, int64_t u_stride, T* op, int64_t rows,
                   int64_t inner) {
  at::parallel_for(0, rows, grain(rows, inner), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * g_stride;
      const T* u = up + r * u_stride;
      T* o = op + r * inner;
      for (int64_t i = 0; i < inner; ++i) {
        const float a = load(g, i);
        store(o, i, a / (1.f + fast_exp(-a)) * load(u, i));
      }
    }
  });
}

template <typename T, typename C>
void rope_kv_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                  torch::Tensor& kbuf, torch::Tensor& vbuf, int64_t column, int64_t nq, int64_t nkv,
                  double scale, torch::Tensor& q) {
  const int64_t rows = qkv.size(0), d = kbuf.size(-1), half = d / 2;
  const int64_t row_stride = qkv.stride(0);
  const T* src = ptr<T>(qkv);
  const float* cp = ptr<float>(cos);
  const float* sp = ptr<float>(sin);
  C* kp = ptr<C>(kbuf);
  C* vp = ptr<C>(vbuf);
  float* qp = ptr<float>(q);
  const int64_t ks0 = kbuf.stride(0), ks1 = kbuf.stride(1), ks2 = kbuf.stride(2);
  const int64_t vs0 = vbuf.stride(0), vs1 = vbuf.stride(1), vs2 = vbuf.stride(2);
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows, grain(rows, (nq + 2 * nkv) * d), [&](int64_t begin, int64_t end) {
    std::vector<float> rot(d);
    for (int64_t r = begin; r < end; ++r) {
      const T* x = src + r * row_stride;
      const float* c = cp + r * d;
      const float* sn = sp + r * d;  // signed: [-sin_1, sin_2], so out = x cos + roll(x) sin
      for (int64_t h = 0; h < nq + nkv; ++h) {
        const T* xh = x + h * d;
        for (int64_t i = 0; i < half; ++i) {
          rot[i] = load(xh, i) * c[i] + load(xh, i + half) * sn[i];
        }
        for (int64_t i = half; i < d; ++i) {
          rot[i] = load(xh, i) * c[i] + load(xh, i - half) * sn[i];
        }
        if (h < nq) {
          float* qo = qp + (r * nq + h) * d;
          for (int64_t i = 0; i < d; ++i) {
            qo[i] = rot[i] * s;
          }
        } else {
          C* ko = kp + r * ks0 + (h - nq) * ks1 + column * ks2;
          for (int64_t i = 0; i < d; ++i) {
            store(ko, i, rot[i]);
          }
        }
      }
      for (int64_t h = 0; h < nkv; ++h) {
        const T* xh = x + (nq + nkv + h) * d;
        C* vo = vp + r * vs0 + h * vs1 + column * vs2;
        for (int64_t i = 0; i < d; ++i) {
          store(vo, i, load(xh, i));
        }
      }
    }
  });
}

// Softmax in place over each of the `groups` score rows of `length` values.
inline void softmax_rows(float* scores, int64_t groups, int64_t length) {
  for (int64_t g = 0; g < groups; ++g) {
    float* sg = scores + g * length;
    const float top = *std::max_element(sg, sg + length);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t l = 0; l < length; ++l) {
      sg[l] = fast_exp(sg[l] - top);
      total += sg[l];
    }
    const float inv = 1.f / total;
    for (int64_t l = 0; l < length; ++l) {
      sg[l] *= inv;
    }
  }
}

// One (row, key/value head) of decode attention, portable loops: the `groups` query heads at qh
// (groups x d) over `length` keys / values (rows `ks` / `vs` apart); acc (groups x d) gets the
// output, scores (groups x length) is scratch.
template <typename C>
void attend_item(const float* qh, const C* kh, int64_t ks, const C* vh, int64_t vs, const bool* mrow,
                 int64_t length, int64_t groups, int64_t d, float* scores, float* acc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < length; ++l) {
    const C* key = kh + l * ks;
    const bool keep = mrow == nullptr || mrow[l];
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = qh + g * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d; ++i) {
        dot += qg[i] * load(key, i);
      }
      scores[g * length + l] = keep ? dot : neg_inf;
    }
  }
  softmax_rows(scores, groups, length);
  std::fill(acc, acc + groups * d, 0.f);
  for (int64_t l = 0; l < length; ++l) {
    const C* value = vh + l * vs;
    for (int64_t g = 0; g < groups; ++g) {
      const float p = scores[g * length + l];
      float* ag = acc + g * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        ag[i] += p * load(value, i);
      }
    }
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 bf16 -> fp32: the raw bits shifted up
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The 16 horizontal sums of a[0..15] as one vector: lane j = sum of a[j]'s lanes (a transpose by
// adds: 45 instructions where 16 separate reductions take ~140).
inline __m512 hsum16(const __m512* a) {
  __m512 t[8], u[4];
  for (int j = 0; j < 8; ++j) {  // per 128-bit block: [x0+x2, y0+y2, x1+x3, y1+y3] of x = a[2j], y = a[2j+1]
    t[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
  }
  for (int j = 0; j < 4; ++j) {  // lane k of each block: that block's sum of a[4j + k]
    u[j] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// attend_item for a head size of NC x 16 with AVX-512. The portable loops reduce every (key, head)
// dot product horizontally right after one dependent chain of FMAs, and keep the output in memory
// (~9 GFLOP/s on one core, SmolLM2's shape); here 16 keys' products run as independent chains,
// reduced together (`hsum16`), and the output stays in registers, two accumulators per chunk to
// hide the FMA latency.
template <typename C, int NC>
void attend_item_avx512(const float* qh, const C* kh, int64_t ks, const C* vh, int64_t vs, const bool* mrow,
                        int64_t length, int64_t groups, float* scores, float* acc) {
  constexpr int64_t D = NC * 16;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 qv[NC];
    for (int c = 0; c < NC; ++c) {
      qv[c] = _mm512_loadu_ps(qh + g * D + c * 16);
    }
    float* sg = scores + g * length;
    int64_t l = 0;
    for (; l + 16 <= length; l += 16) {
      __m512 a[16];
      for (int j = 0; j < 16; ++j) {
        a[j] = _mm512_mul_ps(qv[0], load16(kh + (l + j) * ks));
      }
      for (int c = 1; c < NC; ++c) {
        for (int j = 0; j < 16; ++j) {
          a[j] = _mm512_fmadd_ps(qv[c], load16(kh + (l + j) * ks + c * 16), a[j]);
        }
      }
      _mm512_storeu_ps(sg + l, hsum16(a));
    }
    for (; l < length; ++l) {
      __m512 a = _mm512_mul_ps(qv[0], load16(kh + l * ks));
      for (int c = 1; c < NC; ++c) {
        a = _mm512_fmadd_ps(qv[c], load16(kh + l * ks + c * 16), a);
      }
      sg[l] = _mm512_reduce_add_ps(a);
    }
    if (mrow != nullptr) {
      for (int64_t i = 0; i < length; ++i) {
        sg[i] = mrow[i] ? sg[i] : -std::numeric_limits<float>::infinity();
      }
    }
  }
  softmax_rows(scores, groups, length);
  for (int64_t g = 0; g < groups; ++g) {
    const float* sg = scores + g * length;
    __m512 even[NC], odd[NC];
    for (int c = 0; c < NC; ++c) {
      even[c] = _mm512_setzero_ps();
      odd[c] = _mm512_setzero_ps();
    }
    int64_t l = 0;
    for (; l + 2 <= length; l += 2) {
      const __m512 p0 = _mm512_set1_ps(sg[l]), p1 = _mm512_set1_ps(sg[l + 1]);
      for (int c = 0; c < NC; ++c) {
        even[c] = _mm512_fmadd_ps(p0, load16(vh + l * vs + c * 16), even[c]);
        odd[c] = _mm512_fmadd_ps(p1, load16(vh + (l + 1) * vs + c * 16), odd[c]);
      }
    }
    if (l < length) {
      const __m512 p0 = _mm512_set1_ps(sg[l]);
      for (int c = 0; c < NC; ++c) {
        even[c] = _mm512_fmadd_ps(p0, load16(vh + l * vs + c * 16), even[c]);
      }
    }
    for (int c = 0; c < NC; ++c) {
      _mm512_storeu_ps(acc + g * D + c * 16, _mm512_add_ps(even[c], odd[c]));
    }
  }
}
#endif

template <typename C, typename O>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& kbuf, const torch::Tensor& vbuf,
                           int64_t length, const c10::optional<torch::Tensor>& mask, torch::Tensor& out,
                           bool portable) {
  const int64_t rows = q.size(0), nq = q.size(1), d = q.size(2), nkv = kbuf.size(1), groups = nq / nkv;
  const float* qp = ptr<float>(q);
  const C* kp = ptr<C>(kbuf);
  const C* vp = ptr<C>(vbuf);
  O* op = ptr<O>(out);
  const bool* mp = mask.has_value() ? ptr<bool>(*mask) : nullptr;
  const int64_t mstride = mask.has_value() ? mask->stride(0) : 0;
  const int64_t ks0 = kbuf.stride(0), ks1 = kbuf.stride(1), ks2 = kbuf.stride(2);
  const int64_t vs0 = vbuf.stride(0), vs1 = vbuf.stride(1), vs2 = vbuf.stride(2);
  at::parallel_for(0, rows * nkv, grain(rows * nkv, 2 * length * d), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * length), acc(groups * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / nkv, h = item % nkv;
      const float* qh = qp + (r * nq + h * groups) * d;  // query heads h*G .. h*G+G-1
      const C* kh = kp + r * ks0 + h * ks1;
      const C* vh = vp + r * vs0 + h * vs1;
      const bool* mrow = mp != nullptr ? mp + r * mstride : nullptr;
      bool done = false;
#if defined(__AVX512F__)
      if (!portable) {
        done = true;
        if (d == 32) {
          attend_item_avx512<C, 2>(qh, kh, ks2, vh, vs2, mrow, length, groups, scores.data(), acc.data());
        } else if (d == 64) {
          attend_item_avx512<C, 4>(qh, kh, ks2, vh, vs2, mrow, length, groups, scores.data(), acc.data());
        } else if (d == 128) {
          attend_item_avx512<C, 8>(qh, kh, ks2, vh, vs2, mrow, length, groups, scores.data(), acc.data());
        } else {
          done = false;
        }
      }
#endif
      if (!done) {
        attend_item(qh, kh, ks2, vh, vs2, mrow, length, groups, d, scores.data(), acc.data());
      }
      O* orow = op + (r * nq + h * groups) * d;
      for (int64_t i = 0; i < groups * d; ++i) {
        store(orow, i, acc[i]);
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------
// Training: RMSNorm and SiLU * up, forward and backward.

inline float round_bf16(float v) {
  uint16_t raw;
  store(&raw, 0, v);
  return load(&raw, 0);
}

// y = w * h, h = x * r, r = 1 / sqrt(mean(x^2) + eps), as HF's LlamaRMSNorm: h is rounded to x's
// dtype before the weight (a no-op for fp32 x); y, computed in fp32, is stored in O.
template <typename T, typename W, typename O>
void rms_norm_fwd_impl(const torch::Tensor& x, const torch::Tensor& w, double eps, torch::Tensor& out,
                       torch::Tensor& rstd) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const T* xp = ptr<T>(x);
  const W* wp = ptr<W>(w);
  O* op = ptr<O>(out);
  float* rp = ptr<float>(rstd);
  at::parallel_for(0, rows, grain(rows, n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * n;
      O* orow = op + r * n;
      const float inv = row_rstd(xr, n, eps);
      rp[r] = inv;
      for (int64_t i = 0; i < n; ++i) {
        float h = load(xr, i) * inv;
        if constexpr (is_bf16<T>()) {
          h = round_bf16(h);
        }
        store(orow, i, load(wp, i) * h);
      }
    }
  });
}

// grad_x = r * (g_h - h * mean(g_h * h)), g_h = g * w; grad_w = sum over rows of g * h (fp32).
template <typename T, typename W, typename G>
void rms_norm_bwd_impl(const torch::Tensor& grad, const torch::Tensor& x, const torch::Tensor& w,
                       const torch::Tensor& rstd, torch::Tensor& grad_x, torch::Tensor& grad_w) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const G* gp = ptr<G>(grad);
  const T* xp = ptr<T>(x);
  const W* wp = ptr<W>(w);
  const float* rp = ptr<float>(rstd);
  T* gxp = ptr<T>(grad_x);
  const int64_t threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads * n), 0.f);  // per-thread sums of g * h
  at::parallel_for(0, rows, grain(rows, 2 * n), [&](int64_t begin, int64_t end) {
    float* gw = partial.data() + at::get_thread_num() * n;
    std::vector<float> gh(n), h(n);
    for (int64_t r = begin; r < end; ++r) {
      const G* gr = gp + r * n;
      const T* xr = xp + r * n;
      const float inv = rp[r];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < n; ++i) {
        float hv = load(xr, i) * inv;
        if constexpr (is_bf16<T>()) {
          hv = round_bf16(hv);
        }
        const float g = load(gr, i);
        h[i] = hv;
        gh[i] = g * load(wp, i);
        gw[i] += g * hv;
        dot += gh[i] * hv;
      }
      const float mean = dot / static_cast<float>(n);
      T* gx = gxp + r * n;
      for (int64_t i = 0; i < n; ++i) {
        store(gx, i, inv * (gh[i] - h[i] * mean));
      }
    }
  });
  float* out = ptr<float>(grad_w);
  for (int64_t i = 0; i < n; ++i) {
    float total = 0.f;
    for (int64_t t = 0; t < threads; ++t) {
      total += partial[t * n + i];
    }
    out[i] = total;
  }
}

// d/dgate: g * up * s * (1 + a * (1 - s)), s = sigmoid(a); d/dup: g * silu(a).
template <typename T, typename G>
void silu_mul_bwd_impl(const torch::Tensor& grad, const torch::Tensor& gate, const torch::Tensor& up,
                       torch::Tensor& grad_gate, torch::Tensor& grad_up) {
  const int64_t total = gate.numel();
  const G* gp = ptr<G>(grad);
  const T* ap = ptr<T>(gate);
  const T* upp = ptr<T>(up);
  T* ggp = ptr<T>(grad_gate);
  T* gup = ptr<T>(grad_up);
  at::parallel_for(0, total, kGrainElements, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float a = load(ap, i), u = load(upp, i), g = load(gp, i);
      const float sig = 1.f / (1.f + fast_exp(-a));
      store(ggp, i, g * u * sig * (1.f + a * (1.f - sig)));
      store(gup, i, g * a * sig);
    }
  });
}



// exp(v - m), exactly 0 for v = -inf (a masked token), as softmax gives.
inline float softmax_weight(float v, float m) {
  return v == -std::numeric_limits<float>::infinity() ? 0.f : fast_exp(v - m);
}

// One row of sample_softmax: the token whose softmax CDF first exceeds u (found over block sums,
// then inside the chosen block, as `hf_engine.draw`) and its log-prob. `sums` holds ceil(V / block)
// floats, `cum` block floats. A block or token of weight 0 is never chosen.
template <typename T>
void sample_row(const T* x, int64_t vocab, int64_t block, float u, float* sums, float* cum, int64_t* tok,
                float* logp) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < vocab; ++i) {
    m = std::max(m, load(x, i));
  }
  const int64_t blocks = (vocab + block - 1) / block;
  float total = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * block, hi = std::min(vocab, lo + block);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = lo; i < hi; ++i) {
      s += softmax_weight(load(x, i), m);
    }
    sums[b] = s;
    total += s;
  }
  if (!(total > 0.f) || !std::isfinite(total) || !std::isfinite(m)) {  // NaN or infinite logits
    *tok = 0;
    *logp = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float target = u * total;
  float before = 0.f, kept = 0.f;
  int64_t b = -1;
  for (int64_t j = 0; j < blocks; ++j) {
    if (sums[j] <= 0.f) {
      continue;
    }
    b = j;  // the last block of positive weight so far: where rounding at u ~ 1 ends up
    kept = before;
    if (before + sums[j] > target) {
      break;
    }
    before += sums[j];
  }
  const int64_t lo = b * block, hi = std::min(vocab, lo + block);
  float within = 0.f;
  for (int64_t i = lo; i < hi; ++i) {
    within += softmax_weight(load(x, i), m);
    cum[i - lo] = within;
  }
  const float rest = std::min(target - kept, within * (1.f - 1.f / (1 << 20)));  // inside the block's mass
  int64_t t = lo;
  while (t < hi - 1 && cum[t - lo] <= rest) {
    ++t;
  }
  *tok = t;
  *logp = load(x, t) - m - std::log(total);
}

bool is_float_or_bf16(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16;
}

// Calls fn with a null pointer of the storage type of t (float or bf16's uint16_t).
template <typename Fn>
void with_type(const torch::Tensor& t, Fn&& fn) {
  if (t.scalar_type() == torch::kBFloat16) {
    fn(static_cast<uint16_t*>(nullptr));
  } else {
    fn(static_cast<float*>(nullptr));
  }
}

template <typename Fn>
void with_type(torch::ScalarType dtype, Fn&& fn) {
  if (dtype == torch::kBFloat16) {
    fn(static_cast<uint16_t*>(nullptr));
  } else {
    fn(static_cast<float*>(nullptr));
  }
}

}  // namespace

// x (..., n) updated in place to x + delta when delta is given; returns RMSNorm(x) * weight.
torch::Tensor add_rms_norm_(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor weight, double eps) {
  check_cpu(x, "x");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "add_rms_norm_: contiguous x and weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "add_rms_norm_: weight dtype must be x's");
  if (delta.has_value()) {
    TORCH_CHECK(delta->is_contiguous() && delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type(),
                "add_rms_norm_: delta must be contiguous, shaped and typed as x");
  }
  TORCH_CHECK(is_float_or_bf16(x), "add_rms_norm_: float32 or bfloat16");
  auto out = torch::empty_like(x);
  with_type(x, [&](auto* t) { add_rms_norm_impl<std::remove_pointer_t<decltype(t)>>(x, delta, weight, out, eps); });
  return out;
}

// gate_up (..., 2 I) contiguous -> silu(gate) * up (..., I).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0, "silu_mul: contiguous, even last dim");
  auto sizes = gate_up.sizes().vec();
  sizes.back() /= 2;
  TORCH_CHECK(is_float_or_bf16(gate_up), "silu_mul: float32 or bfloat16");
  auto out = torch::empty(sizes, gate_up.options());
  const int64_t inner = out.size(-1);
  if (out.numel() == 0) {
    return out;
  }
  with_type(gate_up, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    const T* g = ptr<T>(gate_up);
    silu_mul_rows(g, 2 * inner, g + inner, 2 * inner, ptr<T>(out), out.numel() / inner, inner);
  });
  return out;
}

// qkv (R, (nq + 2 nkv) d) of one new token per row; cos, signed sin (R, d) fp32; k/v buffers
// (R, nkv, capacity, d) written at ``column``. Returns q * scale (R, nq, d) fp32.
torch::Tensor rope_kv_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kbuf,
                       torch::Tensor vbuf, int64_t column, int64_t nq, int64_t nkv, double scale) {
  check_cpu(qkv, "qkv");
  const int64_t rows = qkv.size(0), d = kbuf.size(-1);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (nq + 2 * nkv) * d, "rope_kv_: qkv shape");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat &&
                  sin.scalar_type() == torch::kFloat && cos.numel() == rows * d && sin.numel() == rows * d,
              "rope_kv_: cos / sin (R, d) float32");
  TORCH_CHECK(kbuf.dim() == 4 && vbuf.dim() == 4 && kbuf.size(0) >= rows && vbuf.size(0) >= rows &&
                  kbuf.size(1) == nkv && vbuf.size(1) == nkv && kbuf.stride(3) == 1 && vbuf.stride(3) == 1 &&
                  vbuf.size(3) == d && d % 2 == 0,
              "rope_kv_: k / v buffers (>= R, nkv, capacity, d)");
  TORCH_CHECK(column >= 0 && column < kbuf.size(2) && column < vbuf.size(2), "rope_kv_: column past the capacity");
  TORCH_CHECK(kbuf.scalar_type() == vbuf.scalar_type(), "rope_kv_: k and v buffers of one dtype");
  auto q = torch::empty({rows, nq, d}, qkv.options().dtype(torch::kFloat));
  TORCH_CHECK(is_float_or_bf16(qkv) && is_float_or_bf16(kbuf), "rope_kv_: float32 or bfloat16");
  with_type(qkv, [&](auto* t) {
    with_type(kbuf, [&](auto* c) {
      using T = std::remove_pointer_t<decltype(t)>;
      using C = std::remove_pointer_t<decltype(c)>;
      rope_kv_impl<T, C>(qkv, cos, sin, kbuf, vbuf, column, nq, nkv, scale, q);
    });
  });
  return q;
}

// q (R, nq, d) fp32 (scaled); k / v buffers (>= R, nkv, capacity, d); the first ``length`` columns
// attended, where ``mask`` (R, >= length) bool allows. Returns (R, nq * d) in ``out_dtype``.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor kbuf, torch::Tensor vbuf, int64_t length,
                               c10::optional<torch::Tensor> mask, torch::ScalarType out_dtype, bool portable) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kFloat, "decode_attention: q (R, nq, d) f32");
  const int64_t rows = q.size(0), nq = q.size(1), d = q.size(2);
  TORCH_CHECK(kbuf.dim() == 4 && vbuf.dim() == 4 && kbuf.size(0) >= rows && vbuf.size(0) >= rows &&
                  kbuf.size(1) == vbuf.size(1) && nq % kbuf.size(1) == 0 && kbuf.size(3) == d &&
                  vbuf.size(3) == d && kbuf.stride(3) == 1 && vbuf.stride(3) == 1,
              "decode_attention: k / v buffers (>= R, nkv, capacity, d)");
  TORCH_CHECK(length >= 1 && length <= kbuf.size(2) && length <= vbuf.size(2), "decode_attention: length");
  TORCH_CHECK(kbuf.scalar_type() == vbuf.scalar_type(), "decode_attention: k and v buffers of one dtype");
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->dim() == 2 && mask->size(0) == rows &&
                    mask->size(1) >= length && mask->stride(1) == 1,
                "decode_attention: mask (R, >= length) bool");
  }
  TORCH_CHECK(is_float_or_bf16(kbuf) && (out_dtype == torch::kFloat || out_dtype == torch::kBFloat16),
              "decode_attention: float32 or bfloat16");
  auto out = torch::empty({rows, nq * d}, q.options().dtype(out_dtype));
  with_type(kbuf, [&](auto* c) {
    with_type(out_dtype, [&](auto* o) {
      using C = std::remove_pointer_t<decltype(c)>;
      using O = std::remove_pointer_t<decltype(o)>;
      decode_attention_impl<C, O>(q, kbuf, vbuf, length, mask, out, portable);
    });
  });
  return out;
}

// Whether decode_attention has its AVX-512 path for head size d (else the portable loops run).
bool decode_attention_vectorized(int64_t d) {
#if defined(__AVX512F__)
  return d == 32 || d == 64 || d == 128;
#else
  (void)d;
  return false;
#endif
}

// logits (R, V) contiguous, u (R,) fp32 uniforms in [0, 1): [tokens (R,) int64, log-probs (R,) fp32]
// of one draw per row from softmax(logits); a row with NaN or infinite logits gets token 0 and a NaN
// log-prob.
std::vector<torch::Tensor> sample_softmax(torch::Tensor logits, torch::Tensor u, int64_t block) {
  check_cpu(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && is_float_or_bf16(logits) && logits.size(1) > 0,
              "sample_softmax: logits (R, V) contiguous float32 or bfloat16");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(u.dim() == 1 && u.size(0) == rows && u.is_contiguous() && u.scalar_type() == torch::kFloat,
              "sample_softmax: u (R,) float32");
  TORCH_CHECK(block >= 1, "sample_softmax: block >= 1");
  auto tok = torch::empty({rows}, logits.options().dtype(torch::kLong));
  auto logp = torch::empty({rows}, logits.options().dtype(torch::kFloat));
  const int64_t blocks = (vocab + block - 1) / block;
  const float* up = ptr<float>(u);
  int64_t* tp = ptr<int64_t>(tok);
  float* lp = ptr<float>(logp);
  with_type(logits, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    const T* x = ptr<T>(logits);
    at::parallel_for(0, rows, grain(rows, vocab), [&](int64_t begin, int64_t end) {
      std::vector<float> sums(blocks), cum(block);
      for (int64_t r = begin; r < end; ++r) {
        sample_row(x + r * vocab, vocab, block, up[r], sums.data(), cum.data(), tp + r, lp + r);
      }
    });
  });
  return {tok, logp};
}

// x (..., n), weight (n,): (RMSNorm(x) * weight in out_dtype, 1 / rms per row (rows,) fp32).
std::vector<torch::Tensor> rms_norm_fwd(torch::Tensor x, torch::Tensor weight, double eps, torch::ScalarType out_dtype) {
  check_cpu(x, "x");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm_fwd: contiguous x (..., n) and weight (n,)");
  TORCH_CHECK(is_float_or_bf16(x) && is_float_or_bf16(weight) &&
                  (out_dtype == torch::kFloat || out_dtype == torch::kBFloat16),
              "rms_norm_fwd: float32 or bfloat16");
  auto out = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  auto rstd = torch::empty({x.numel() / x.size(-1)}, x.options().dtype(torch::kFloat));
  with_type(x, [&](auto* t) {
    with_type(weight, [&](auto* w) {
      with_type(out_dtype, [&](auto* o) {
        using T = std::remove_pointer_t<decltype(t)>;
        using W = std::remove_pointer_t<decltype(w)>;
        using O = std::remove_pointer_t<decltype(o)>;
        rms_norm_fwd_impl<T, W, O>(x, weight, eps, out, rstd);
      });
    });
  });
  return {out, rstd};
}

// (grad_x in x's dtype, grad_weight fp32 (n,)) of rms_norm_fwd, from its output's gradient.
std::vector<torch::Tensor> rms_norm_bwd(torch::Tensor grad, torch::Tensor x, torch::Tensor weight, torch::Tensor rstd) {
  check_cpu(grad, "grad");
  TORCH_CHECK(grad.is_contiguous() && x.is_contiguous() && grad.sizes() == x.sizes() && rstd.is_contiguous() &&
                  rstd.scalar_type() == torch::kFloat && rstd.numel() * x.size(-1) == x.numel(),
              "rms_norm_bwd: contiguous grad shaped as x, rstd (rows,) float32");
  TORCH_CHECK(is_float_or_bf16(grad) && is_float_or_bf16(x) && is_float_or_bf16(weight), "rms_norm_bwd: float32 or bfloat16");
  auto grad_x = torch::empty_like(x);
  auto grad_w = torch::empty({x.size(-1)}, x.options().dtype(torch::kFloat));
  with_type(x, [&](auto* t) {
    with_type(weight, [&](auto* w) {
      with_type(grad, [&](auto* g) {
        using T = std::remove_pointer_t<decltype(t)>;
        using W = std::remove_pointer_t<decltype(w)>;
        using G = std::remove_pointer_t<decltype(g)>;
        rms_norm_bwd_impl<T, W, G>(grad, x, weight, rstd, grad_x, grad_w);
      });
    });
  });
  return {grad_x, grad_w};
}

// silu(gate) * up, both contiguous, one shape and dtype.
torch::Tensor silu_mul_fwd(torch::Tensor gate, torch::Tensor up) {
  check_cpu(gate, "gate");
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes() &&
                  gate.scalar_type() == up.scalar_type() && is_float_or_bf16(gate),
              "silu_mul_fwd: contiguous gate and up of one shape and dtype (float32 or bfloat16)");
  auto out = torch::empty_like(gate);
  const int64_t inner = gate.size(-1);
  if (out.numel() == 0) {
    return out;
  }
  with_type(gate, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    silu_mul_rows(ptr<T>(gate), inner, ptr<T>(up), inner, ptr<T>(out), gate.numel() / inner, inner);
  });
  return out;
}

// (grad_gate, grad_up) of silu_mul_fwd.
std::vector<torch::Tensor> silu_mul_bwd(torch::Tensor grad, torch::Tensor gate, torch::Tensor up) {
  check_cpu(grad, "grad");
  TORCH_CHECK(grad.is_contiguous() && gate.is_contiguous() && up.is_contiguous() && grad.sizes() == gate.sizes() &&
                  up.sizes() == gate.sizes() && gate.scalar_type() == up.scalar_type() && is_float_or_bf16(grad) &&
                  is_float_or_bf16(gate),
              "silu_mul_bwd: contiguous grad, gate and up of one shape (float32 or bfloat16)");
  auto grad_gate = torch::empty_like(gate), grad_up = torch::empty_like(up);
  with_type(gate, [&](auto* t) {
    with_type(grad, [&](auto* g) {
      silu_mul_bwd_impl<std::remove_pointer_t<decltype(t)>, std::remove_pointer_t<decltype(g)>>(grad, gate, up,
                                                                                               grad_gate, grad_up);
    });
  });
  return {grad_gate, grad_up};
}
