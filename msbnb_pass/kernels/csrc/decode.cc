// Kernels of the lean decode step (msbnb_pass.models.generation): RMSNorm (with the residual add),
// RoPE fused with the split of a fused q/k/v projection into heads, attention over the KV cache with
// grouped-query heads, SiLU(gate) * up, and a float32 matmul that streams one or more weights [N, K]
// (the fused q/k/v or gate/up projections of a float model, and the float32 output head).
//
// Why: inside a compiled MindSpore graph every op costs 15-100 us of launch overhead on the CPU backend,
// which at SmolLM2's size dwarfs the arithmetic. Each kernel here replaces 2-20 MindSpore ops.
//
// Everything is float32 with a fixed summation order (independent of the thread count): the same
// inputs always give the same bits. Compiled once with the baseline flags (no ISA dispatch): the loops
// keep 16 independent partial sums so that the compiler vectorises them without reassociating (the
// library is built with -ffp-contract=off and without fast-math), and these kernels are bound by launch
// overhead or by memory bandwidth, not by arithmetic.
#include <immintrin.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <vector>

#include "msbnb.h"

#define MSBNB_EXPORT extern "C" __attribute__((visibility("default")))

extern "C" const char *msbnb_isa();  // api.cc

namespace msbnb {
namespace {

char g_decode_error[512] = "";

int dfail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int dfail(int code, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_decode_error, sizeof(g_decode_error), fmt, args);
  va_end(args);
  return code;
}

int64_t count(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}
bool f32(const char *dtype) { return std::strcmp(dtype, "float32") == 0; }

constexpr int kLanes = 16;
// Workers spin this long for the next job after a decode-step kernel's (see threadpool.cc: the lean step's ops
// run back to back, so a longer spin than the default keeps the second thread awake between layers).
constexpr int kDecodeSpinUs = 300;

// The fixed pairwise reduction of 16 lane sums (lane j += lane j + w for w = 8, 4, 2, 1).
inline float reduce16(float *lanes) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  return lanes[0];
}

// sum_i a[i] * b[i] in float32: 16 lane sums, then reduce16
inline float dot(const float *a, const float *b, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  return reduce16(acc);
}

// y = x / sqrt(mean(x^2) + eps) * w for one row; the mean is summed in float64 (exact enough to round once)
inline void rms_row(const float *x, const float *w, int64_t h, float eps, float *y) {
  double ss = 0.0;
  for (int64_t i = 0; i < h; ++i) ss += (double)x[i] * (double)x[i];
  const float var = (float)(ss / (double)h);
  const float r = (float)(1.0 / std::sqrt((double)var + (double)eps));
  for (int64_t i = 0; i < h; ++i) y[i] = (x[i] * r) * w[i];
}

}  // namespace
}  // namespace msbnb

using namespace msbnb;

MSBNB_EXPORT const char *msbnb_decode_last_error() { return g_decode_error; }

// RMSNorm.  inputs: x [..., H], weight [H], eps float32 [1]; output y like x
MSBNB_EXPORT int MsbnbRmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  if (nparam != 4) return dfail(1, "MsbnbRmsNorm takes 3 inputs and 1 output, got %d", nparam);
  if (!f32(dtypes[0]) || !f32(dtypes[1]) || !f32(dtypes[2]) || !f32(dtypes[3]))
    return dfail(2, "MsbnbRmsNorm: every tensor must be float32");
  if (ndims[0] < 1 || ndims[1] != 1) return dfail(3, "MsbnbRmsNorm: x [..., H] and weight [H] expected");
  const int64_t h = shapes[1][0];
  if (shapes[0][ndims[0] - 1] != h) return dfail(4, "MsbnbRmsNorm: x's last dimension is not H=%lld", (long long)h);
  const int64_t rows = count(ndims[0], shapes[0]) / (h > 0 ? h : 1);
  if (count(ndims[3], shapes[3]) != rows * h) return dfail(5, "MsbnbRmsNorm: y has the wrong size");
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  for (int64_t r = 0; r < rows; ++r) rms_row(x + r * h, w, h, eps, y + r * h);
  return 0;
}

// The residual add and the next RMSNorm.  inputs: x [..., H], h [..., H], weight [H], eps float32 [1];
// outputs: s = x + h, y = RMSNorm(s)
MSBNB_EXPORT int MsbnbAddRmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                 void *) {
  if (nparam != 6) return dfail(1, "MsbnbAddRmsNorm takes 4 inputs and 2 outputs, got %d", nparam);
  for (int i = 0; i < 6; ++i)
    if (!f32(dtypes[i])) return dfail(2, "MsbnbAddRmsNorm: every tensor must be float32");
  if (ndims[0] < 1 || ndims[2] != 1) return dfail(3, "MsbnbAddRmsNorm: x [..., H] and weight [H] expected");
  const int64_t hd = shapes[2][0], n = count(ndims[0], shapes[0]);
  if (shapes[0][ndims[0] - 1] != hd || count(ndims[1], shapes[1]) != n || count(ndims[4], shapes[4]) != n ||
      count(ndims[5], shapes[5]) != n)
    return dfail(4, "MsbnbAddRmsNorm: x, h, s and y must all hold [..., %lld]", (long long)hd);
  const float *x = static_cast<const float *>(params[0]);
  const float *h = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *s = static_cast<float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  for (int64_t i = 0; i < n; ++i) s[i] = x[i] + h[i];
  const int64_t rows = n / (hd > 0 ? hd : 1);
  for (int64_t r = 0; r < rows; ++r) rms_row(s + r * hd, w, hd, eps, y + r * hd);
  return 0;
}

// RoPE (rotate-half layout) of a fused q/k/v projection, split into heads.
// inputs: qkv [B, T, (NH + 2 * NKV) * D], cos [B, T, D], sin [B, T, D], meta int64 [2] (NH, NKV);
// outputs: q [B, NH, T, D], k [B, NKV, T, D] (both rotated), v [B, NKV, T, D]
MSBNB_EXPORT int MsbnbRopeSplit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                void *) {
  if (nparam != 7) return dfail(1, "MsbnbRopeSplit takes 4 inputs and 3 outputs, got %d", nparam);
  if (!f32(dtypes[0]) || !f32(dtypes[1]) || !f32(dtypes[2]) || !f32(dtypes[4]) || !f32(dtypes[5]) || !f32(dtypes[6]))
    return dfail(2, "MsbnbRopeSplit: qkv, cos, sin and the outputs must be float32");
  if (std::strcmp(dtypes[3], "int64") != 0 || count(ndims[3], shapes[3]) != 2)
    return dfail(2, "MsbnbRopeSplit: meta must be int64 [2] (heads, kv_heads)");
  if (ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3) return dfail(3, "MsbnbRopeSplit: 3-D qkv, cos, sin expected");
  const int64_t *meta = static_cast<const int64_t *>(params[3]);
  const int64_t nh = meta[0], nkv = meta[1], B = shapes[0][0], T = shapes[0][1], D = shapes[1][2];
  if (nh < 1 || nkv < 1 || D < 2 || D % 2 || shapes[0][2] != (nh + 2 * nkv) * D || shapes[1][0] != B ||
      shapes[1][1] != T || count(3, shapes[2]) != B * T * D)
    return dfail(4, "MsbnbRopeSplit: shapes do not match heads=%lld, kv_heads=%lld", (long long)nh, (long long)nkv);
  if (count(ndims[4], shapes[4]) != B * nh * T * D || count(ndims[5], shapes[5]) != B * nkv * T * D ||
      count(ndims[6], shapes[6]) != B * nkv * T * D)
    return dfail(5, "MsbnbRopeSplit: outputs have the wrong size");
  const float *qkv = static_cast<const float *>(params[0]);
  const float *cs = static_cast<const float *>(params[1]);
  const float *sn = static_cast<const float *>(params[2]);
  float *outs[3] = {static_cast<float *>(params[4]), static_cast<float *>(params[5]), static_cast<float *>(params[6])};
  const int64_t heads[3] = {nh, nkv, nkv}, width = (nh + 2 * nkv) * D, half = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float *row = qkv + (b * T + t) * width;
      const float *c = cs + (b * T + t) * D, *s = sn + (b * T + t) * D;
      int64_t col = 0;
      for (int part = 0; part < 3; ++part)
        for (int64_t hh = 0; hh < heads[part]; ++hh, col += D) {
          const float *x = row + col;
          float *o = outs[part] + ((b * heads[part] + hh) * T + t) * D;
          if (part == 2) {
            std::memcpy(o, x, sizeof(float) * D);
            continue;
          }
          // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): two products and a sum, as unfused ops
          for (int64_t i = 0; i < half; ++i) o[i] = x[i] * c[i] + (-x[i + half]) * s[i];
          for (int64_t i = half; i < D; ++i) o[i] = x[i] * c[i] + x[i - half] * s[i];
        }
    }
  return 0;
}

// Attention of q over the KV cache with grouped-query heads (query head j reads kv head j / (NH / NKV)).
// inputs: q [B, NH, T, D], k_cache [B, NKV, S, D], v_cache [B, NKV, S, D], mask [B, T, S] (additive: 0 or
// <= -1e29 for a hidden slot), scale float32 [1]; output [B, T, NH * D].
// A slot whose mask is <= -1e29 gets probability exactly 0 (as exp(-1e30 - max) underflows to 0) and is skipped.
namespace msbnb {
namespace {
// One query row's attention over the S slots of its key/value head with AVX-512, for D a multiple of 16 up to 128:
// the same IEEE operations in the same order as the generic loop below (dot()'s 16 lanes and pairwise reduction,
// the softmax and the weighted sum of v in slot order; no FMA contraction), so the same bits, with the unmasked
// slots gathered first, four slots' dot products side by side and the sum of v in D / 16 vector accumulators.
// Returns false (nothing written) for other D.
__attribute__((target("avx512f"))) bool attend_row_avx512(const float *qv, const float *kb, const float *vb,
                                                          const float *m, int64_t S, int64_t D, float scale,
                                                          float *p, int64_t *live, float *o) {
  if (D % 16 || D > 128 || D < 16) return false;
  const int64_t nv = D / 16;
  int64_t n = 0;
  for (int64_t s = 0; s < S; ++s)
    if (!(m[s] <= -1e29f)) live[n++] = s;
  float mx = -INFINITY;
  alignas(64) float lanes[4][kLanes];
  int64_t j = 0;
  for (; j < n; j += 4) {
    const int g = (int)(n - j < 4 ? n - j : 4);
    __m512 a[4];
    for (int r = 0; r < 4; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t v = 0; v < nv; ++v) {
      const __m512 xq = _mm512_loadu_ps(qv + 16 * v);
      for (int r = 0; r < g; ++r) a[r] = _mm512_add_ps(a[r], _mm512_mul_ps(xq, _mm512_loadu_ps(kb + live[j + r] * D + 16 * v)));
    }
    for (int r = 0; r < g; ++r) {
      _mm512_store_ps(lanes[r], a[r]);
      const int64_t s = live[j + r];
      p[s] = reduce16(lanes[r]) * scale + m[s];
      if (p[s] > mx) mx = p[s];
    }
  }
  if (mx == -INFINITY) {  // every slot hidden (never happens in generate), or no score above -inf: as below
    for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
    return true;
  }
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = live[i];
    p[s] = std::exp(p[s] - mx);
    total += p[s];
  }
  __m512 acc[8];
  for (int64_t v = 0; v < nv; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = live[i];
    const __m512 ps = _mm512_set1_ps(p[s]);
    const float *vr = vb + s * D;
    for (int64_t v = 0; v < nv; ++v) acc[v] = _mm512_add_ps(acc[v], _mm512_mul_ps(ps, _mm512_loadu_ps(vr + 16 * v)));
  }
  const __m512 tv = _mm512_set1_ps(total);
  for (int64_t v = 0; v < nv; ++v) _mm512_storeu_ps(o + 16 * v, _mm512_div_ps(acc[v], tv));
  return true;
}
}  // namespace
}  // namespace msbnb

MSBNB_EXPORT int MsbnbCacheAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *, void *) {
  const SpinHint hint(kDecodeSpinUs);
  if (nparam != 6) return dfail(1, "MsbnbCacheAttention takes 5 inputs and 1 output, got %d", nparam);
  for (int i = 0; i < 6; ++i)
    if (!f32(dtypes[i])) return dfail(2, "MsbnbCacheAttention: every tensor must be float32");
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 3)
    return dfail(3, "MsbnbCacheAttention: q, caches 4-D and mask 3-D expected");
  const int64_t B = shapes[0][0], NH = shapes[0][1], T = shapes[0][2], D = shapes[0][3];
  const int64_t NKV = shapes[1][1], S = shapes[1][2];
  if (NKV < 1 || NH % NKV || shapes[1][0] != B || shapes[1][3] != D || count(4, shapes[2]) != B * NKV * S * D ||
      shapes[3][0] != B || shapes[3][1] != T || shapes[3][2] != S || count(ndims[5], shapes[5]) != B * T * NH * D)
    return dfail(4, "MsbnbCacheAttention: inconsistent shapes");
  const float *q = static_cast<const float *>(params[0]);
  const float *kc = static_cast<const float *>(params[1]);
  const float *vc = static_cast<const float *>(params[2]);
  const float *mask = static_cast<const float *>(params[3]);
  const float scale = *static_cast<const float *>(params[4]);
  float *out = static_cast<float *>(params[5]);
  const int64_t rep = NH / NKV;
  const bool avx512 = std::strcmp(msbnb_isa(), "avx512") == 0;  // the same bits either way; api.cc checks the CPU
  auto task = [&](int64_t job) {  // one (b, query head)
    const int64_t b = job / NH, h = job % NH, g = h / rep;
    const float *kb = kc + (b * NKV + g) * S * D, *vb = vc + (b * NKV + g) * S * D;
    float *p = static_cast<float *>(scratch(0, sizeof(float) * (size_t)(S > 0 ? S : 1)));
    float *acc = static_cast<float *>(scratch(1, sizeof(float) * (size_t)(D > 0 ? D : 1)));
    int64_t *live = static_cast<int64_t *>(scratch(2, sizeof(int64_t) * (size_t)(S > 0 ? S : 1)));
    for (int64_t t = 0; t < T; ++t) {
      const float *qv = q + ((b * NH + h) * T + t) * D;
      const float *m = mask + (b * T + t) * S;
      if (avx512 && attend_row_avx512(qv, kb, vb, m, S, D, scale, p, live, out + ((b * T + t) * NH + h) * D)) continue;
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (m[s] <= -1e29f) continue;
        p[s] = dot(qv, kb + s * D, D) * scale + m[s];
        if (p[s] > mx) mx = p[s];
      }
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        if (m[s] <= -1e29f) continue;
        p[s] = std::exp(p[s] - mx);
        total += p[s];
      }
      for (int64_t i = 0; i < D; ++i) acc[i] = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        if (m[s] <= -1e29f) continue;
        const float ps = p[s];
        const float *vr = vb + s * D;
        for (int64_t i = 0; i < D; ++i) acc[i] += ps * vr[i];
      }
      float *o = out + ((b * T + t) * NH + h) * D;
      if (mx == -INFINITY) {  // every slot hidden: no token to attend to (never happens in generate)
        for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
      } else {
        for (int64_t i = 0; i < D; ++i) o[i] = acc[i] / total;
      }
    }
  };
  // split over the heads from ~64K products (a decode step of 9 heads over 128 slots: 1.07x the step in an A/B)
  if (B * NH > 1 && B * NH * T * S * D >= 65536)
    parallel_tasks(B * NH, [&](int64_t j) { task(j); });
  else
    for (int64_t j = 0; j < B * NH; ++j) task(j);
  return 0;
}

// SiLU(gate) * up of a fused gate/up projection.  input: gu [..., 2 * I] (gate first); output [..., I]
MSBNB_EXPORT int MsbnbSwiGlu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                             void *) {
  if (nparam != 2) return dfail(1, "MsbnbSwiGlu takes 1 input and 1 output, got %d", nparam);
  if (!f32(dtypes[0]) || !f32(dtypes[1])) return dfail(2, "MsbnbSwiGlu: float32 expected");
  if (ndims[0] < 1 || shapes[0][ndims[0] - 1] % 2) return dfail(3, "MsbnbSwiGlu: the last dimension must be even");
  const int64_t two_i = shapes[0][ndims[0] - 1], inter = two_i / 2;
  const int64_t rows = count(ndims[0], shapes[0]) / (two_i > 0 ? two_i : 1);
  if (count(ndims[1], shapes[1]) != rows * inter) return dfail(4, "MsbnbSwiGlu: output has the wrong size");
  const float *gu = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  for (int64_t r = 0; r < rows; ++r) {
    const float *g = gu + r * two_i, *u = g + inter;
    float *o = y + r * inter;
    for (int64_t i = 0; i < inter; ++i) o[i] = (g[i] / (1.0f + std::exp(-g[i]))) * u[i];
  }
  return 0;
}

// y[..., sum N_i] = x[..., K] @ [W_1; ...; W_g]^T for float32 weights W_i [N_i, K] (no bias).
// inputs: x, W_1, ..., W_g; output y.  Rows of the output are split into chunks run on the kernel threads;
// each output value is one dot product (fixed order), so the result does not depend on the thread count.
MSBNB_EXPORT int MsbnbLinearF32(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                void *) {
  const SpinHint hint(kDecodeSpinUs);
  const int g = nparam - 2;
  if (g < 1 || g > 8) return dfail(1, "MsbnbLinearF32 takes x, 1 to 8 weights and 1 output, got %d tensors", nparam);
  for (int i = 0; i < nparam; ++i)
    if (!f32(dtypes[i])) return dfail(2, "MsbnbLinearF32: every tensor must be float32");
  if (ndims[0] < 1) return dfail(3, "MsbnbLinearF32: x must have at least one dimension");
  const int64_t K = shapes[0][ndims[0] - 1], M = count(ndims[0] - 1, shapes[0]);
  int64_t total = 0;
  int64_t starts[9];
  for (int i = 0; i < g; ++i) {
    if (ndims[1 + i] != 2 || shapes[1 + i][1] != K)
      return dfail(4, "MsbnbLinearF32: weight %d must be [N, %lld]", i, (long long)K);
    starts[i] = total;
    total += shapes[1 + i][0];
  }
  starts[g] = total;
  if (count(ndims[nparam - 1], shapes[nparam - 1]) != M * total) return dfail(5, "MsbnbLinearF32: y has the wrong size");
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[nparam - 1]);
  constexpr int64_t kChunk = 64;  // output columns per task
  const int64_t ntasks = (total + kChunk - 1) / kChunk;
  auto task = [&](int64_t t) {
    const int64_t lo = t * kChunk, hi = lo + kChunk < total ? lo + kChunk : total;
    for (int64_t n = lo; n < hi; ++n) {
      int i = 0;
      while (n >= starts[i + 1]) ++i;
      const float *w = static_cast<const float *>(params[1 + i]) + (n - starts[i]) * K;
      for (int64_t m = 0; m < M; ++m) y[m * total + n] = dot(x + m * K, w, K);
    }
  };
  if (total * K * (M > 0 ? M : 1) >= 65536)
    parallel_tasks(ntasks, [&](int64_t t) { task(t); });
  else
    for (int64_t t = 0; t < ntasks; ++t) task(t);
  return 0;
}

// The float32 head kept as int8 codes with one float32 scale per 32 weights of a row, when that is lossless
// (w = q * d exactly, as for a GGUF Q8_0 embedding and its dequantized twin): y[..., N] = x[..., K] @ W^T
// with W = q * d decoded exactly, float32 products and sums: the float32 weights' result, a quarter of the
// bytes streamed. inputs: x [..., K], q int8 [N, K], d float32 [N, K / 32]; output y [..., N].
namespace msbnb {
namespace {
constexpr int64_t kQ8Block = 32;

// Lane j (0..15) of the accumulator sums ((float)q * d) * x over the elements j and 16 + j of every block, in
// block order; then the fixed pairwise reduction of dot(). The AVX-512 (one zmm), AVX2 (two ymm) and portable
// versions do the same IEEE operations in the same order: the same bits on every machine.

__attribute__((target("avx512f"))) float q8_dot_avx512(const float *x, const int8_t *q, const float *d, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 s = _mm512_set1_ps(d[b]);
    const int8_t *qb = q + b * kQ8Block;
    const float *xb = x + b * kQ8Block;
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qb))));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qb + 16))));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(w0, s), _mm512_loadu_ps(xb)));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(w1, s), _mm512_loadu_ps(xb + 16)));
  }
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, acc);
  return reduce16(lanes);
}

// q8_dot_avx512 for 4 consecutive rows of q (row stride K) side by side: each row's steps in the same order, so
// the same bits, with four independent chains of adds instead of one (the single row waits on add latency);
// the same lines of the next 4 rows are prefetched (each row is a short stream the prefetchers pick up late).
__attribute__((target("avx512f"))) void q8_dot4_avx512(const float *x, const int8_t *q, const float *d, int64_t nb,
                                                        int64_t K, bool prefetch, float *out) {
  __m512 acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const float *xb = x + b * kQ8Block;
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    for (int r = 0; r < 4; ++r) {
      const int8_t *qb = q + r * K + b * kQ8Block;
      if (prefetch && (b & 1) == 0) _mm_prefetch(reinterpret_cast<const char *>(qb + 4 * K), _MM_HINT_T0);
      const __m512 s = _mm512_set1_ps(d[r * nb + b]);
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qb))));
      const __m512 w1 =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qb + 16))));
      acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_mul_ps(w0, s), x0));
      acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_mul_ps(w1, s), x1));
    }
  }
  alignas(64) float lanes[kLanes];
  for (int r = 0; r < 4; ++r) {
    _mm512_store_ps(lanes, acc[r]);
    out[r] = reduce16(lanes);
  }
}

__attribute__((target("avx2"))) float q8_dot_avx2(const float *x, const int8_t *q, const float *d, int64_t nb) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0-7 and 8-15
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 s = _mm256_set1_ps(d[b]);
    const int8_t *qb = q + b * kQ8Block;
    const float *xb = x + b * kQ8Block;
    for (int half = 0; half < 2; ++half) {
      const int8_t *qh = qb + 16 * half;
      const float *xh = xb + 16 * half;
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(qh))));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(qh + 8))));
      lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_mul_ps(w0, s), _mm256_loadu_ps(xh)));
      hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_mul_ps(w1, s), _mm256_loadu_ps(xh + 8)));
    }
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, lo);
  _mm256_store_ps(lanes + 8, hi);
  return reduce16(lanes);
}

float q8_dot_portable(const float *x, const int8_t *q, const float *d, int64_t nb) {
  float acc[kLanes] = {0};
  for (int64_t b = 0; b < nb; ++b) {
    const float s = d[b];
    for (int half = 0; half < 2; ++half)
      for (int j = 0; j < kLanes; ++j) {
        const int64_t i = b * kQ8Block + 16 * half + j;
        acc[j] += ((float)q[i] * s) * x[i];
      }
  }
  return reduce16(acc);
}

typedef float (*Q8Dot)(const float *, const int8_t *, const float *, int64_t);

// the instruction set the library runs (msbnb_set_isa / MSBNB_ISA; api.cc checks the CPU has it)
Q8Dot q8_dot() {
  const char *isa = msbnb_isa();
  if (std::strcmp(isa, "avx512") == 0) return q8_dot_avx512;
  if (std::strcmp(isa, "avx2") == 0) return q8_dot_avx2;
  return q8_dot_portable;
}

void q8_rows(const float *x, int64_t M, int64_t K, const int8_t *q, const float *d, int64_t n0, int64_t n1,
             int64_t N, float *y) {
  const Q8Dot dot8 = q8_dot();
  const int64_t nb = K / kQ8Block;
  int64_t n = n0;
  if (dot8 == q8_dot_avx512) {
    float out[4];
    for (; n + 4 <= n1; n += 4)
      for (int64_t m = 0; m < M; ++m) {
        q8_dot4_avx512(x + m * K, q + n * K, d + n * nb, nb, K, m == 0 && n + 8 <= N, out);
        for (int r = 0; r < 4; ++r) y[m * N + n + r] = out[r];
      }
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot8(x + m * K, q + n * K, d + n * nb, nb);
}
}  // namespace
}  // namespace msbnb

MSBNB_EXPORT int MsbnbLinearQ8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                               void *) {
  const SpinHint hint(kDecodeSpinUs);
  if (nparam != 4) return dfail(1, "MsbnbLinearQ8 takes 3 inputs and 1 output, got %d", nparam);
  if (!f32(dtypes[0]) || std::strcmp(dtypes[1], "int8") != 0 || !f32(dtypes[2]) || !f32(dtypes[3]))
    return dfail(2, "MsbnbLinearQ8: x float32, q int8, d float32 expected");
  if (ndims[0] < 1 || ndims[1] != 2 || ndims[2] != 2) return dfail(3, "MsbnbLinearQ8: q [N, K] and d [N, K/32]");
  const int64_t K = shapes[0][ndims[0] - 1], M = count(ndims[0] - 1, shapes[0]), N = shapes[1][0];
  if (K % kQ8Block || shapes[1][1] != K || shapes[2][0] != N || shapes[2][1] != K / kQ8Block)
    return dfail(4, "MsbnbLinearQ8: K=%lld must be a multiple of 32 and match q [N, K], d [N, K/32]", (long long)K);
  if (count(ndims[3], shapes[3]) != M * N) return dfail(5, "MsbnbLinearQ8: y has the wrong size");
  const float *x = static_cast<const float *>(params[0]);
  const int8_t *q = static_cast<const int8_t *>(params[1]);
  const float *d = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  constexpr int64_t kChunk = 256;
  const int64_t ntasks = (N + kChunk - 1) / kChunk;
  auto task = [&](int64_t t) {
    const int64_t lo = t * kChunk, hi = lo + kChunk < N ? lo + kChunk : N;
    q8_rows(x, M, K, q, d, lo, hi, N, y);
  };
  if (N * K * (M > 0 ? M : 1) >= 65536)
    parallel_tasks(ntasks, [&](int64_t t) { task(t); });
  else
    for (int64_t t = 0; t < ntasks; ++t) task(t);
  return 0;
}

// ---- one whole decoder layer of the lean step in one launch ----------------------------------------------------
extern "C" int MsbnbLinear4bitMulti(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *, void *);  // api.cc
extern "C" const char *msbnb_last_error();            // api.cc

namespace msbnb {
namespace {

// The argument arrays of one call of another entry point, built from tensors of this launch or buffers of it.
struct Call {
  std::vector<void *> p;
  std::vector<int> nd;
  std::vector<int64_t *> sh;
  std::vector<const char *> dt;
  std::vector<std::vector<int64_t>> own;  // shapes of the buffers (stable addresses: reserved up front)
  Call() { own.reserve(16); }
  void tensor(void *ptr, int ndim, int64_t *shape, const char *dtype) {
    p.push_back(ptr);
    nd.push_back(ndim);
    sh.push_back(shape);
    dt.push_back(dtype);
  }
  void buffer(float *ptr, std::vector<int64_t> shape) {
    own.push_back(std::move(shape));
    tensor(ptr, (int)own.back().size(), own.back().data(), "float32");
  }
  int run(int (*fn)(int, void **, int *, int64_t **, const char **, void *, void *)) {
    return fn((int)p.size(), p.data(), nd.data(), sh.data(), dt.data(), nullptr, nullptr);
  }
};

int sub_failed(const char *what, int rc, bool from_api) {
  char copy[sizeof(g_decode_error)];
  std::snprintf(copy, sizeof(copy), "%s", from_api ? msbnb_last_error() : g_decode_error);
  return dfail(rc, "MsbnbDecodeLayer4bit: %s: %s", what, copy);
}

}  // namespace
}  // namespace msbnb

// A decoder layer of the lean step, for layers whose seven projections are 4-bit (each in its compute mode): the
// same kernels in the same order as the per-op step (fused q/k/v projection, RoPE + split, the KV cache
// write, attention, o projection, residual add + RMSNorm, fused gate/up, SwiGLU, down projection, residual
// add + the next RMSNorm), so the same bits, in one launch instead of eleven (the launches, not the
// arithmetic, dominate a small model's decode step). The caches are written in place.
// inputs: x [B, T, H] (residual stream), a [B, T, H] (x normalised by this layer's input norm), cos, sin
// [B, T, D], meta int64 [2] (heads, kv_heads), k_cache, v_cache [B, KV, S, D], slots int32 [B, KV, T, 3]
// (the cache index of each new key/value), mask [B, T, S], scale [1], post-attention norm weight [H], next
// norm weight [H], eps [1], then q, k, v, o, gate, up, down as MsbnbLinear4bitMulti takes one projection
// (9 tensors each); outputs: x + attention + MLP [B, T, H] and its normalisation by the next norm.
MSBNB_EXPORT int MsbnbDecodeLayer4bit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *, void *) {
  const SpinHint hint(kDecodeSpinUs);
  constexpr int kFixed = 13, kProj = 9, kIn = kFixed + 7 * kProj;
  if (nparam != kIn + 2) return dfail(1, "MsbnbDecodeLayer4bit takes %d inputs and 2 outputs, got %d", kIn, nparam);
  const int X = 0, A = 1, COS = 2, SIN = 3, META = 4, KC = 5, VC = 6, SLOTS = 7, MASK = 8, SCALE = 9, POST = 10,
            NEXT = 11, EPS = 12, XO = kIn, AO = kIn + 1;
  if (ndims[X] != 3 || ndims[KC] != 4 || ndims[SLOTS] != 4 || std::strcmp(dtypes[SLOTS], "int32") != 0)
    return dfail(3, "MsbnbDecodeLayer4bit: x [B, T, H], caches [B, KV, S, D] and int32 slots [B, KV, T, 3] expected");
  if (std::strcmp(dtypes[META], "int64") != 0 || count(ndims[META], shapes[META]) != 2)
    return dfail(2, "MsbnbDecodeLayer4bit: meta must be int64 [2] (heads, kv_heads)");
  const int64_t *meta = static_cast<const int64_t *>(params[META]);
  const int64_t B = shapes[X][0], T = shapes[X][1], H = shapes[X][2];
  const int64_t NH = meta[0], NKV = meta[1], S = shapes[KC][2], D = shapes[KC][3];
  if (NKV < 1 || shapes[KC][0] != B || shapes[KC][1] != NKV || count(4, shapes[VC]) != B * NKV * S * D ||
      shapes[SLOTS][0] != B || shapes[SLOTS][1] != NKV || shapes[SLOTS][2] != T || shapes[SLOTS][3] != 3)
    return dfail(4, "MsbnbDecodeLayer4bit: caches and slots do not match x and heads=%lld, kv_heads=%lld",
                 (long long)NH, (long long)NKV);
  auto proj_n = [&](int i) { return shapes[kFixed + kProj * i + 7][0]; };  // the bias [N] gives N
  const int64_t NQKV = proj_n(0) + proj_n(1) + proj_n(2), NGU = proj_n(4) + proj_n(5), I = NGU / 2;
  const int64_t M = B * T;
  // the intermediates, one buffer per launch thread (reused across layers and steps)
  static thread_local std::vector<float> buf;
  const int64_t sizes[] = {M * NQKV, B * NH * T * D, B * NKV * T * D, B * NKV * T * D, M * NH * D, M * H,
                           M * H,    M * H,          M * NGU,         M * I,           M * H};
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  if ((int64_t)buf.size() < total) buf.resize((size_t)total);
  float *ptrs[11];
  float *cur = buf.data();
  for (int i = 0; i < 11; ++i) {
    ptrs[i] = cur;
    cur += sizes[i];
  }
  float *qkv = ptrs[0], *q = ptrs[1], *k = ptrs[2], *v = ptrs[3], *o = ptrs[4], *h = ptrs[5], *x1 = ptrs[6],
        *a1 = ptrs[7], *gu = ptrs[8], *sw = ptrs[9], *h2 = ptrs[10];
  auto project = [&](const char *what, float *in, int64_t K, std::initializer_list<int> which, float *out,
                     int64_t N) {
    Call c;
    c.buffer(in, {B, T, K});
    for (int i : which)
      for (int j = 0; j < kProj; ++j) {
        const int idx = kFixed + kProj * i + j;
        c.tensor(params[idx], ndims[idx], shapes[idx], dtypes[idx]);
      }
    c.buffer(out, {B, T, N});
    const int rc = c.run(MsbnbLinear4bitMulti);
    return rc ? sub_failed(what, rc, true) : 0;
  };
  if (int rc = project("q/k/v projection", static_cast<float *>(params[A]), H, {0, 1, 2}, qkv, NQKV)) return rc;
  {
    Call c;
    c.buffer(qkv, {B, T, NQKV});
    c.tensor(params[COS], ndims[COS], shapes[COS], dtypes[COS]);
    c.tensor(params[SIN], ndims[SIN], shapes[SIN], dtypes[SIN]);
    c.tensor(params[META], ndims[META], shapes[META], dtypes[META]);
    c.buffer(q, {B, NH, T, D});
    c.buffer(k, {B, NKV, T, D});
    c.buffer(v, {B, NKV, T, D});
    if (int rc = c.run(MsbnbRopeSplit)) return sub_failed("RoPE", rc, false);
  }
  {  // the cache write: what ScatterNdUpdate(cache, slots, k) does, index triple by index triple
    const int32_t *sl = static_cast<const int32_t *>(params[SLOTS]);
    float *kc = static_cast<float *>(params[KC]), *vc = static_cast<float *>(params[VC]);
    for (int64_t r = 0; r < B * NKV * T; ++r) {
      const int64_t b = sl[3 * r], hh = sl[3 * r + 1], s = sl[3 * r + 2];
      if (b < 0 || b >= B || hh < 0 || hh >= NKV || s < 0 || s >= S)
        return dfail(6, "MsbnbDecodeLayer4bit: slot (%lld, %lld, %lld) is outside the cache [%lld, %lld, %lld]",
                     (long long)b, (long long)hh, (long long)s, (long long)B, (long long)NKV, (long long)S);
      std::memcpy(kc + ((b * NKV + hh) * S + s) * D, k + r * D, sizeof(float) * D);
      std::memcpy(vc + ((b * NKV + hh) * S + s) * D, v + r * D, sizeof(float) * D);
    }
  }
  {
    Call c;
    c.buffer(q, {B, NH, T, D});
    c.tensor(params[KC], ndims[KC], shapes[KC], dtypes[KC]);
    c.tensor(params[VC], ndims[VC], shapes[VC], dtypes[VC]);
    c.tensor(params[MASK], ndims[MASK], shapes[MASK], dtypes[MASK]);
    c.tensor(params[SCALE], ndims[SCALE], shapes[SCALE], dtypes[SCALE]);
    c.buffer(o, {B, T, NH * D});
    if (int rc = c.run(MsbnbCacheAttention)) return sub_failed("attention", rc, false);
  }
  if (int rc = project("o projection", o, NH * D, {3}, h, H)) return rc;
  auto add_norm = [&](const char *what, float *xin, float *hin, int W, float *xout, float *aout) {
    Call c;
    c.buffer(xin, {B, T, H});
    c.buffer(hin, {B, T, H});
    c.tensor(params[W], ndims[W], shapes[W], dtypes[W]);
    c.tensor(params[EPS], ndims[EPS], shapes[EPS], dtypes[EPS]);
    c.buffer(xout, {B, T, H});
    c.buffer(aout, {B, T, H});
    const int rc = c.run(MsbnbAddRmsNorm);
    return rc ? sub_failed(what, rc, false) : 0;
  };
  if (int rc = add_norm("post-attention norm", static_cast<float *>(params[X]), h, POST, x1, a1)) return rc;
  if (int rc = project("gate/up projection", a1, H, {4, 5}, gu, NGU)) return rc;
  {
    Call c;
    c.buffer(gu, {B, T, NGU});
    c.buffer(sw, {B, T, I});
    if (int rc = c.run(MsbnbSwiGlu)) return sub_failed("SwiGLU", rc, false);
  }
  if (int rc = project("down projection", sw, I, {6}, h2, H)) return rc;
  for (int out : {XO, AO})
    if (!f32(dtypes[out]) || count(ndims[out], shapes[out]) != M * H)
      return dfail(5, "MsbnbDecodeLayer4bit: the outputs must be float32 [B, T, H]");
  return add_norm("next norm", x1, h2, NEXT, static_cast<float *>(params[XO]), static_cast<float *>(params[AO]));
}
