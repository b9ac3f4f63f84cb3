// Kernels for x86-64 with AVX-512 (F, BW, VL, DQ) and AVX512-VNNI.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#include <type_traits>

#include "msbnb.h"

namespace msbnb {
namespace isa_avx512 {
namespace {

const char *const kIsaName = "avx512";
constexpr int VW = 16;
constexpr int kFusedRows = 4;
typedef __m512 VF;

inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vset1(float v) { return _mm512_set1_ps(v); }
inline VF vload(const float *p) { return _mm512_loadu_ps(p); }
inline void vstore(float *p, VF v) { _mm512_storeu_ps(p, v); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline float vsum(VF v) { return _mm512_reduce_add_ps(v); }
inline VF vload_n(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p); }

struct Lut {
  __m512 t;
};
inline Lut make_lut(const float *code, float s, float off, bool asym) {
  __m512 c = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(s));
  if (asym) c = _mm512_add_ps(c, _mm512_set1_ps(off));
  return Lut{c};
}
// 16 codes from 8 bytes, high nibble first: duplicate each byte into two 32-bit lanes, shift the even
// lanes right by 4; vpermps only looks at the low 4 bits of each index.
inline VF lut_decode(const Lut &l, const uint8_t *p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(p));
  __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
  v = _mm512_srlv_epi32(v, _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4));
  return _mm512_permutexvar_ps(v, l.t);
}
inline VF load_i8(const int8_t *p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
}

// int8 x int8 with VPDPBUSD (unsigned x signed): each weight byte is made unsigned on the fly (w + 128,
// one xor), the activations stay signed, and every dot product is corrected by 128 * sum(x_q).
constexpr int64_t I8_STEP = 64;
constexpr int32_t I8_W_OFFSET = 128;

template <int MR, int NR>
void i8_micro(const int8_t *x, int64_t ldx, const int8_t *w, int64_t K, int32_t (*acc)[4]) {
  __m512i a[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) a[i][j] = _mm512_setzero_si512();
  int64_t k = 0;
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (; k + 64 <= K; k += 64) {
    __m512i xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_si512(x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + j * K + k), flip);
      for (int i = 0; i < MR; ++i) a[i][j] = _mm512_dpbusd_epi32(a[i][j], wv, xv[i]);
    }
  }
  if (k < K) {  // tail: masked loads give x = 0 beyond K, so whatever the weight lanes hold adds nothing
    const __mmask64 m = (K - k) >= 64 ? ~0ull : ((1ull << (K - k)) - 1ull);
    __m512i xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_epi8(m, x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + j * K + k), flip);
      for (int i = 0; i < MR; ++i) a[i][j] = _mm512_dpbusd_epi32(a[i][j], wv, xv[i]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_reduce_add_epi32(a[i][j]);
}

typedef void (*I8Fn)(const int8_t *, int64_t, const int8_t *, int64_t, int32_t (*)[4]);
const I8Fn kI8[4][4] = {
    {i8_micro<1, 1>, i8_micro<1, 2>, i8_micro<1, 3>, i8_micro<1, 4>},
    {i8_micro<2, 1>, i8_micro<2, 2>, i8_micro<2, 3>, i8_micro<2, 4>},
    {i8_micro<3, 1>, i8_micro<3, 2>, i8_micro<3, 3>, i8_micro<3, 4>},
    {i8_micro<4, 1>, i8_micro<4, 2>, i8_micro<4, 3>, i8_micro<4, 4>},
};
inline void i8_block(const int8_t *x, int64_t ldx, int mr, const int8_t *w, int64_t K, int nr, int32_t (*acc)[4]) {
  kI8[mr - 1][nr - 1](x, ldx, w, K, acc);
}


// ---- quantizer helpers --------------------------------------------------------------------------------------
#include "quant_scalar.inc"  // index_pack_scalar for the tail of index_pack

inline __mmask16 nonfinite_mask(__m512 v) {
  const __m512 a = _mm512_abs_ps(v);
  return _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.402823466e38f), _CMP_NLE_UQ);  // > FLT_MAX or NaN
}
float absmax_n(const float *p, int64_t n, int64_t *bad) {
  __m512 m = _mm512_setzero_ps();
  int64_t nb = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(p + i);
    nb += __builtin_popcount(nonfinite_mask(v));
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(k, p + i);
    nb += __builtin_popcount(nonfinite_mask(v) & k);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
  }
  *bad += nb;
  return _mm512_reduce_max_ps(m);
}
void minmax_n(const float *p, int64_t n, float *lo, float *hi, int64_t *bad) {
  __m512 mn = _mm512_set1_ps(p[0]), mx = mn;
  int64_t nb = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(p + i);
    nb += __builtin_popcount(nonfinite_mask(v));
    mn = _mm512_min_ps(mn, v);
    mx = _mm512_max_ps(mx, v);
  }
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(p[0]), k, p + i);
    nb += __builtin_popcount(nonfinite_mask(v) & k);
    mn = _mm512_min_ps(mn, v);
    mx = _mm512_max_ps(mx, v);
  }
  *bad += nb;
  *lo = _mm512_reduce_min_ps(mn);
  *hi = _mm512_reduce_max_ps(mx);
}
// Scale (x - mid) by `factor` (multiply, or divide when `divide`), clamp to [-1, 1], find the nearest code
// by counting the midpoints below the value (binary lifting over a 16-entry table) and pack 2 per byte.
void index_pack(const float *p, int64_t n, bool divide, float factor, float mid, const float *bounds,
                const uint8_t *order, uint8_t *out) {
  alignas(64) float b16[16];
  alignas(64) int32_t o16[16];
  for (int i = 0; i < 15; ++i) b16[i] = bounds[i];
  b16[15] = __builtin_inff();
  for (int i = 0; i < 16; ++i) o16[i] = order[i];
  const __m512 B = _mm512_load_ps(b16), F = _mm512_set1_ps(factor), MID = _mm512_set1_ps(mid);
  const __m512 one = _mm512_set1_ps(1.f), mone = _mm512_set1_ps(-1.f);
  const __m512i O = _mm512_load_si512(o16);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_sub_ps(_mm512_loadu_ps(p + i), MID);
    v = divide ? _mm512_div_ps(v, F) : _mm512_mul_ps(v, F);
    v = _mm512_max_ps(_mm512_min_ps(v, one), mone);
    __m512i c = _mm512_setzero_si512();
    for (int step = 8; step >= 1; step >>= 1) {
      const __m512 t = _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), B);
      c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ), c, _mm512_set1_epi32(step));
    }
    const __m512i idx = _mm512_permutexvar_epi32(c, O);
    const __m128i bytes = _mm512_cvtepi32_epi8(idx);  // i0 i1 i2 ... i15
    const __m128i pairs = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(bytes, _mm_set1_epi16(0xFF)), 4),
                                       _mm_srli_epi16(bytes, 8));
    _mm_storel_epi64(reinterpret_cast<__m128i *>(out + i / 2), _mm_packus_epi16(pairs, pairs));
  }
  if (i < n) index_pack_scalar(p + i, n - i, divide, factor, mid, bounds, order, out + i / 2);
}

}  // namespace

#include "impl_common.inc"

namespace {

// ---- 4-bit GEMV/small-M by nibble planes ------------------------------------------------------------------------
// 64 packed bytes hold 128 codes; viewed as 16 dwords, shifting every dword right by 4*s puts, for each s in
// 0..7, one code into the low 4 bits of every lane, and vpermps (which reads only those 4 bits) turns the
// lanes into code values: 8 shifts + 8 permutes decode 128 weights. Lane j of plane s is weight
// 8*j + kPlanePos[s] of the chunk, so the activations are permuted once per call to match. The code table
// stays unscaled; each chunk's partial sums are multiplied by the absmax of the block each lane lies in.
const int kPlanePos[8] = {1, 0, 3, 2, 5, 4, 7, 6};

// The absmax of blocks [b0, b0 + count) into out: copied, or with double quantization decoded 16 at a time as
// w.scale decodes each, fl(fl(nested_code[q] * nested_absmax[b / nested_bs]) + nested_offset) (no contraction:
// the same bits). One at a time, ~7 scalar operations per block of 64 weights had taken about half of the NF4 +
// DQ GEMV's time on one thread: called through ctypes, one thread, weights in cache, same bits before and after:
// 576x576 22.3 -> 18.4 us, 1536x576 46.0 -> 42.2 us. (A first measurement of the new build, 14.9 / 32.8 us, had
// run on two threads. On two threads both versions took 14-15 / 31-32 us.)
inline void block_scales(const W4 &w, int64_t b0, int64_t count, float *out) {
  if (w.absmax) {
    for (int64_t i = 0; i < count; ++i) out[i] = w.absmax[b0 + i];
    return;
  }
  int64_t i = 0;
  if (w.nested_shift >= 0 && w.nested_shift < 31) {
    const int sh = w.nested_shift;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 off = _mm512_set1_ps(w.nested_offset);
    for (; i < count; i += 16) {
      const int64_t b = b0 + i, nb0 = b >> sh;
      const __mmask16 m = count - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - i)) - 1u);
      const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, w.qabsmax + b));
      const __m512 c = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, q, w.nested_code, 4);
      const __m512i nidx = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(b - (nb0 << sh))), lane), sh);
      const __m512 na = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, nidx, w.nested_absmax + nb0, 4);
      _mm512_mask_storeu_ps(out + i, m, _mm512_add_ps(_mm512_mul_ps(c, na), off));
    }
    return;
  }
  for (; i < count; ++i) out[i] = w.scale(b0 + i);
}

// Rows [n, n + R) of a GEMV's row group (rows past the rc valid ones repeat row n): their packed bytes, their
// index, and the absmax of every block (decoded once per row with double quantization, so the chunk loop only
// broadcasts them).
template <int R>
inline void row_group(const W4 &w, int64_t n, int rc, const uint8_t **rows, int64_t *row, float *scales) {
  const int64_t bpr = w.K / w.bs;
  for (int r = 0; r < R; ++r) {
    row[r] = n + (r < rc ? r : 0);
    rows[r] = w.packed + row[r] * (w.K / 2);
  }
  if (rc == R) {  // consecutive rows: consecutive blocks
    block_scales(w, n * bpr, R * bpr, scales);
    return;
  }
  for (int r = 0; r < R; ++r) block_scales(w, row[r] * bpr, bpr, scales + r * bpr);
}

// Per-lane block values (scale or offset) of one 128-weight chunk: lane j holds weights 8j..8j+7, so with
// blocks of 32 lanes 4b..4b+3 share block b, with 64 the upper 8 lanes are the second block.
inline __m512 chunk_lanes(const float *v, int64_t c, int64_t bs, int chunk_shift) {
  if (bs >= 128) return _mm512_set1_ps(v[c >> chunk_shift]);
  if (bs == 64) return _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(v[2 * c]), _mm512_set1_ps(v[2 * c + 1]));
  const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(_mm_loadu_ps(v + 4 * c)));
}

// One 128-weight chunk of N vectors of packed codes v (plane order, see kPlanePos) against M rows of permuted x
// (xc, row stride ldx): add(i, r, a, b) accumulates a * b for row i of x and vector r. Symmetric codes: the
// 8 planes' products are summed unscaled, then added times the lanes' block scales sv[r]; asymmetric: each
// weight is decoded as fl(fl(code * sv[r]) + ov[r]) (the oracle's rounding) before its product.
template <int M, int N, bool ASYM, class Add>
inline void plane_chunk(const __m512i *v, __m512 lut, const float *xc, int64_t ldx, const __m512 *sv,
                        const __m512 *ov, Add add) {
  if (ASYM) {
    for (int s = 0; s < 8; ++s) {
      __m512 xv[M];
      for (int i = 0; i < M; ++i) xv[i] = _mm512_loadu_ps(xc + i * ldx + s * 16);
      for (int r = 0; r < N; ++r) {
        const __m512 code = _mm512_permutexvar_ps(_mm512_srli_epi32(v[r], 4 * s), lut);
        const __m512 wv = _mm512_add_ps(_mm512_mul_ps(code, sv[r]), ov[r]);
        for (int i = 0; i < M; ++i) add(i, r, wv, xv[i]);
      }
    }
    return;
  }
  __m512 part[M][N];
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < N; ++r) part[i][r] = _mm512_setzero_ps();
  for (int s = 0; s < 8; ++s) {
    __m512 xv[M];
    for (int i = 0; i < M; ++i) xv[i] = _mm512_loadu_ps(xc + i * ldx + s * 16);
    for (int r = 0; r < N; ++r) {
      const __m512 wv = _mm512_permutexvar_ps(_mm512_srli_epi32(v[r], 4 * s), lut);
      for (int i = 0; i < M; ++i) part[i][r] = _mm512_fmadd_ps(wv, xv[i], part[i][r]);
    }
  }
  for (int r = 0; r < N; ++r)
    for (int i = 0; i < M; ++i) add(i, r, part[i][r], sv[r]);
}

// Rows [n0, n1) of y = x @ W^T + bias. Symmetric codes: the unscaled code table is decoded, each chunk's
// partial sums are multiplied by the block scale. Asymmetric (block_offset): every weight is decoded exactly
// as the oracle does, fl(fl(code * scale) + offset), before its product. A last half chunk (K % 128 == 64,
// blocks of 32 or 64) is decoded 16 codes at a time in natural order (its activations are not permuted).
template <int M, int R, bool ASYM>
void planes_rows(const float *xp, const W4 &w, int64_t n0, int64_t n1, const float *bias, float *y) {
  const int64_t K = w.K, nchunks = K / 128, bs = w.bs, bpr = K / bs, tail0 = nchunks * 128;
  const __m512 lut = _mm512_loadu_ps(w.code);
  const Lut raw{lut};
  int chunk_shift = 0;  // bs > 128: chunks per block = bs / 128 (a power of two)
  while ((int64_t(128) << chunk_shift) < bs) ++chunk_shift;
  float *scales = static_cast<float *>(scratch(0, sizeof(float) * (size_t)(R * bpr + 16)));
  for (int64_t n = n0; n < n1; n += R) {
    const int rc = (int)imin(R, n1 - n);
    const uint8_t *rows[R];
    int64_t row[R];
    row_group<R>(w, n, rc, rows, row, scales);
    const float *offs[R];
    for (int r = 0; r < R; ++r) offs[r] = ASYM ? w.block_offset + row[r] * bpr : nullptr;
    __m512 acc[M][R];
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nchunks; ++c) {
      __m512i v[R];
      for (int r = 0; r < R; ++r) {
        prefetch_next_group(rows[r] + c * 64, R * (K / 2));
        v[r] = _mm512_loadu_si512(rows[r] + c * 64);
      }
      __m512 sv[R], ov[R];
      for (int r = 0; r < R; ++r) {
        sv[r] = chunk_lanes(scales + r * bpr, c, bs, chunk_shift);
        if (ASYM) ov[r] = chunk_lanes(offs[r], c, bs, chunk_shift);
      }
      plane_chunk<M, R, ASYM>(v, lut, xp + c * 128, K, sv, ov, [&](int i, int r, __m512 a, __m512 b) {
        acc[i][r] = _mm512_fmadd_ps(a, b, acc[i][r]);
      });
    }
    for (int64_t k = tail0; k < K; k += 16) {  // the half chunk: blocks of 32 or 64 only
      const int64_t b = k / bs;
      __m512 xv[M];
      for (int i = 0; i < M; ++i) xv[i] = _mm512_loadu_ps(xp + i * K + k);
      for (int r = 0; r < R; ++r) {
        const __m512 code = lut_decode(raw, rows[r] + k / 2);
        const __m512 s = _mm512_set1_ps(scales[r * bpr + b]);
        const __m512 wv = ASYM ? _mm512_add_ps(_mm512_mul_ps(code, s), _mm512_set1_ps(offs[r][b])) : _mm512_mul_ps(code, s);
        for (int i = 0; i < M; ++i) acc[i][r] = _mm512_fmadd_ps(wv, xv[i], acc[i][r]);
      }
    }
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < rc; ++r) y[i * w.N + n + r] = _mm512_reduce_add_ps(acc[i][r]) + (bias ? bias[n + r] : 0.f);
  }
}

// Rows [n, n + 2P) of y = x @ W^T + bias when K % 128 == 64 (blocks of 32 or 64), as P pairs of rows. A pair's
// packed bytes are contiguous, so it is one stream of 2K / 128 whole chunks: the chunk in the middle holds the
// first row's last 64 weights in lanes 0-7 and the second row's first 64 in lanes 8-15, and its products go to
// each row's sums under a lane mask; x2p is concat(x, x) permuted per chunk as in planes_rows, and the pair's
// block scales (and offsets) are contiguous too. planes_rows decodes such a row's last 64 weights 16 codes at a
// time instead. Measured on the Intel VM (576-wide rows, SmolLM2's): one thread with the weights in L2 about the
// same (576 x 1536: 52-56 us either way), two threads streaming 576 x 1536 42.0 -> 36.5 us (one run), the
// native SmolLM2 decode step 8.56 / 8.45 / 8.46 -> 8.32 / 8.36 / 7.57 ms (alternating processes). Summation
// order per lane: the row's chunks in order, so the result does not depend on how rows are split among threads
// (tasks are whole groups).
template <int M, int P, bool ASYM>
void pair_rows(const float *x2p, const W4 &w, int64_t n, const float *bias, float *y) {
  const int64_t K = w.K, bs = w.bs, bpr = K / bs, half = K / 128, pchunks = 2 * half + 1, K2 = 2 * K;
  const __m512 lut = _mm512_loadu_ps(w.code);
  float *scales = static_cast<float *>(scratch(0, sizeof(float) * (size_t)(2 * P * bpr + 16)));
  block_scales(w, n * bpr, 2 * P * bpr, scales);
  const float *offs = ASYM ? w.block_offset + n * bpr : nullptr;
  const uint8_t *base = w.packed + n * (K / 2);
  const int64_t group_bytes = 2 * P * (K / 2);
  __m512 acc[M][2 * P];
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < 2 * P; ++r) acc[i][r] = _mm512_setzero_ps();
  // mode 0: the first row's chunks, 1: the chunk shared by both rows, 2: the second row's chunks
  auto chunk = [&](int64_t c, auto mode) {
    constexpr int kMode = decltype(mode)::value;
    __m512i v[P];
    for (int p = 0; p < P; ++p) {
      const uint8_t *line = base + p * K + c * 64;  // pair p starts 2p rows of K / 2 bytes in
      prefetch_next_group(line, group_bytes);
      v[p] = _mm512_loadu_si512(line);
    }
    auto add = [&](int i, int p, __m512 a, __m512 b) {  // acc += a * b into the pair's row(s)
      if (kMode == 0) acc[i][2 * p] = _mm512_fmadd_ps(a, b, acc[i][2 * p]);
      if (kMode == 2) acc[i][2 * p + 1] = _mm512_fmadd_ps(a, b, acc[i][2 * p + 1]);
      if (kMode == 1) {
        acc[i][2 * p] = _mm512_mask3_fmadd_ps(a, b, acc[i][2 * p], (__mmask16)0x00FF);
        acc[i][2 * p + 1] = _mm512_mask3_fmadd_ps(a, b, acc[i][2 * p + 1], (__mmask16)0xFF00);
      }
    };
    __m512 sv[P], ov[P];
    for (int p = 0; p < P; ++p) {
      sv[p] = chunk_lanes(scales + 2 * p * bpr, c, bs, 0);
      if (ASYM) ov[p] = chunk_lanes(offs + 2 * p * bpr, c, bs, 0);
    }
    plane_chunk<M, P, ASYM>(v, lut, x2p + c * 128, K2, sv, ov, add);
  };
  for (int64_t c = 0; c < half; ++c) chunk(c, std::integral_constant<int, 0>());
  chunk(half, std::integral_constant<int, 1>());
  for (int64_t c = half + 1; c < pchunks; ++c) chunk(c, std::integral_constant<int, 2>());
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < 2 * P; ++r)
      y[i * w.N + n + r] = _mm512_reduce_add_ps(acc[i][r]) + (bias ? bias[n + r] : 0.f);
}

// y = x @ W^T + bias over tasks of whole row groups: R rows (planes_rows) or, when K % 128 == 64, 2P rows
// (pair_rows; the last group of a task, shorter, by planes_rows).
template <int M, int R, int P>
void planes(const float *xp, const float *x2p, const W4 &w, const float *bias, float *y) {
  const bool pairs = x2p != nullptr;
  const int64_t unit = pairs ? 2 * P : R;
  const int64_t per_task = gemv_rows_per_task(w.N, w.K, unit, 16);
  parallel_tasks(ceil_div(w.N, per_task), [&](int64_t t) {
    int64_t n0 = t * per_task;
    const int64_t n1 = imin(w.N, n0 + per_task);
    if (pairs) {
      for (; n0 + 2 * P <= n1; n0 += 2 * P) {
        if (w.block_offset)
          pair_rows<M, P, true>(x2p, w, n0, bias, y);
        else
          pair_rows<M, P, false>(x2p, w, n0, bias, y);
      }
      if (n0 == n1) return;
    }
    if (w.block_offset)
      planes_rows<M, R, true>(xp, w, n0, n1, bias, y);
    else
      planes_rows<M, R, false>(xp, w, n0, n1, bias, y);
  });
}

// Row-wise int8 quantization of LLM.int8() activations (and of weights), 16 values per step; identical
// results to quantize_row (float32 product, round half to even).
float quantize_row_fast(const float *x, int64_t K, const uint8_t *outlier, float threshold, int8_t *q,
                        int32_t *qsum) {
  __m512 m = _mm512_setzero_ps();
  const __m512 thr = _mm512_set1_ps(threshold);
  int64_t k = 0;
  for (; k < K; k += 16) {
    const __mmask16 lanes = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes, x + k));
    const __mmask16 keep = threshold > 0.f ? _mm512_mask_cmp_ps_mask(lanes, a, thr, _CMP_LT_OQ) : lanes;
    m = _mm512_mask_max_ps(m, keep, m, a);
  }
  const float amax = _mm512_reduce_max_ps(m);
  const float factor = amax > 0.f ? 127.0f / amax : 0.f;
  if (!(factor <= 3.402823466e38f)) return quantize_row(x, K, outlier, threshold, q, qsum);  // subnormal absmax
  const __m512 f = _mm512_set1_ps(factor), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  __m512i sum = _mm512_setzero_si512();
  for (k = 0; k < K; k += 16) {
    const __mmask16 lanes = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + k);
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(xv, f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_max_ps(_mm512_min_ps(v, hi), lo);
    __mmask16 live = lanes;
    if (threshold > 0.f) live &= _mm512_cmp_ps_mask(_mm512_abs_ps(xv), thr, _CMP_LT_OQ);
    if (outlier) {
      const __m128i o = _mm_maskz_loadu_epi8(lanes, outlier + k);
      live &= _mm_cmpeq_epi8_mask(o, _mm_setzero_si128());
    }
    const __m512i qi = _mm512_maskz_cvtps_epi32(live, v);
    sum = _mm512_add_epi32(sum, qi);
    _mm_mask_storeu_epi8(q + k, lanes, _mm512_cvtsepi32_epi8(qi));
  }
  *qsum = _mm512_reduce_add_epi32(sum);
  return amax;
}

// ---- bf16 --------------------------------------------------------------------------------------------------------
BV bload(const uint16_t *p) {
  const __m512i v = _mm512_loadu_si512(p);
  return BV{_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u))),
            _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))};
}

// The same micro-kernel with vdpbf16ps (AVX512-BF16), compiled for it alone and called only when the CPU has it.
#define MSBNB_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")))
template <int MR, int NR>
MSBNB_BF16_TARGET void micro_bf16_native(const uint16_t *x, int64_t ldx, const uint16_t *p, int64_t ldp, int64_t klen,
                                         float *y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < klen; k += 32) {
    __m512i xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_si512(x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const __m512i pv = _mm512_loadu_si512(p + j * ldp + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)pv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] += _mm512_reduce_add_ps(acc[i][j]);
}
const MicroBf16Fn kMicroBf16Native[16] = {
    micro_bf16_native<1, 1>, micro_bf16_native<1, 2>, micro_bf16_native<1, 3>, micro_bf16_native<1, 4>,
    micro_bf16_native<2, 1>, micro_bf16_native<2, 2>, micro_bf16_native<2, 3>, micro_bf16_native<2, 4>,
    micro_bf16_native<3, 1>, micro_bf16_native<3, 2>, micro_bf16_native<3, 3>, micro_bf16_native<3, 4>,
    micro_bf16_native<4, 1>, micro_bf16_native<4, 2>, micro_bf16_native<4, 3>, micro_bf16_native<4, 4>,
};
const MicroBf16Fn *bf16_native_micro() { return bf16_native_enabled() ? kMicroBf16Native : nullptr; }

// panel_dx_bf16's tile with vdpbf16ps: per pair of weight rows, one broadcast pair of dy per row of dx and one
// instruction per vector of 16 outputs (row 2j + 1's product, then row 2j's, as dx_tile_bf16 emulates it).
template <int MR, int KV>
MSBNB_BF16_TARGET void dx_tile_bf16_native(const uint32_t *g, int64_t ldg, int np, const uint32_t *panel, int64_t ld,
                                           float *out, int64_t K) {
  __m512 acc[MR][KV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < KV; ++v) acc[i][v] = _mm512_loadu_ps(out + i * K + v * 16);
  for (int j = 0; j < np; ++j) {
    __m512i p[KV];
    for (int v = 0; v < KV; ++v) p[v] = _mm512_loadu_si512(panel + j * ld + v * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512i b = _mm512_set1_epi32((int)g[i * ldg + j]);
      for (int v = 0; v < KV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)p[v], (__m512bh)b);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < KV; ++v) _mm512_storeu_ps(out + i * K + v * 16, acc[i][v]);
}
const DxBf16Fn kDxBf16Native[3] = {dx_tile_bf16_native<kDxMR, kDxKV>, dx_tile_bf16_native<1, kDxKV>,
                                   dx_tile_bf16_native<1, 1>};
const DxBf16Fn *dx_bf16_native_tiles() { return bf16_native_enabled() ? kDxBf16Native : nullptr; }

// ---- bf16 batches on AMX tiles ----------------------------------------------------------------------------------
// Eight 16 x 64-byte tiles: C in 0-3 (2 x 2 blocks of 16 weight rows x 16 rows of x, float32), two tiles of weight
// rows (16 rows x 32 bf16 of the panel, row-major as decoded) and two of x (16 pairs of k x 16 rows of x).
bool amx_ready() { return amx_bf16_enabled(); }

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#define MSBNB_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f")))
#define MSBNB_AMX_INT8_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl")))
// Configure tiles 0 .. count - 1 as 16 rows x 64 bytes (the only shape the kernels use).
__attribute__((target("amx-tile"))) inline void amx_load_tiles(int count) {
  TileConfig cfg;
  for (int t = 0; t < count; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}
// c[2i + l] = sum over `steps` steps of A_i B_l: A_0 / A_1 are 16 rows at a0 / a1 (row stride lda bytes), B_0 / B_1
// 16 rows at b and 64 bytes further (row stride ldb), each step astep bytes further along A and bstep along B.
MSBNB_AMX_TARGET inline void amx_bf16_2x2(const void *a0, const void *a1, int64_t lda, const void *b, int64_t ldb,
                                          int64_t astep, int64_t bstep, int64_t steps, float (*c)[16][16]) {
  const char *pa0 = static_cast<const char *>(a0), *pa1 = static_cast<const char *>(a1);
  const char *pb = static_cast<const char *>(b);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, pa0 + s * astep, lda);
    _tile_loadd(5, pa1 + s * astep, lda);
    _tile_loadd(6, pb + s * bstep, ldb);
    _tile_loadd(7, pb + s * bstep + 64, ldb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
}

MSBNB_AMX_TARGET void amx_bf16_tiles(const uint32_t *xT, int64_t Mp, int64_t M, const uint16_t *panel, int64_t ld,
                                     int64_t rows, int64_t kpad, int64_t nvalid, float *y, int64_t N) {
  amx_load_tiles(8);
  alignas(64) float c[4][16][16];
  const int64_t lda = ld * (int64_t)sizeof(uint16_t), ldb = Mp * (int64_t)sizeof(uint32_t);
  for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const uint16_t *a0 = panel + r0 * ld;
      // per step 32 bf16 of k: 64 bytes along the panel rows, 16 pairs of k rows of xT
      amx_bf16_2x2(a0, a0 + 16 * ld, lda, xT + m0, ldb, 64, 16 * ldb, kpad / 32, c);
      for (int i = 0; i < 4; ++i)  // c[i][row of the panel][row of x]
        for (int r = 0; r < 16; ++r) {
          const int64_t n = r0 + 16 * (i / 2) + r;
          if (n >= nvalid) break;
          for (int j = 0; j < 16; ++j) {
            const int64_t m = m0 + 16 * (i % 2) + j;
            if (m < M) y[m * N + n] += c[i][r][j];
          }
        }
    }
  }
  _tile_release();
}
void amx_bf16_panel(const uint32_t *xT, int64_t Mp, int64_t M, const uint16_t *panel, int64_t ld, int64_t rows,
                    int64_t kpad, int64_t nvalid, float *y, int64_t N) {
  amx_bf16_tiles(xT, Mp, M, panel, ld, rows, kpad, nvalid, y, N);
}

// dx[m][kb + c] for m in [m0, m0 + 32), c < kvalid: four tiles of 16 rows of dy (A: 16 pairs of n per row) times
// 16 pairs x 16 columns of the pair panel (B), over all npp pairs; rows at or past M are dropped.
MSBNB_AMX_TARGET void amx_bf16_dx_tiles(const uint32_t *g, int64_t ldg, int64_t M, int64_t m0, int64_t npp,
                                        const uint32_t *panel, int64_t ld, int64_t kb, int64_t kvalid, float *dx,
                                        int64_t K) {
  amx_load_tiles(8);
  alignas(64) float c[4][16][16];
  const int64_t lda = ldg * (int64_t)sizeof(uint32_t), ldb = ld * (int64_t)sizeof(uint32_t);
  const uint32_t *a0 = g + m0 * ldg;
  // per step 16 pairs of n: 64 bytes along the rows of g, 16 pair rows of the panel
  amx_bf16_2x2(a0, a0 + 16 * ldg, lda, panel + kb, ldb, 64, 16 * ldb, npp / 16, c);
  _tile_release();
  for (int i = 0; i < 4; ++i)  // c[i][row of dy][column of dx]
    for (int r = 0; r < 16; ++r) {
      const int64_t m = m0 + 16 * (i / 2) + r;
      if (m >= M) break;
      for (int col = 0; col < 16; ++col) {
        const int64_t cc = 16 * (i % 2) + col;
        if (cc < kvalid) dx[m * K + cc] = c[i][r][col];
      }
    }
}
void amx_bf16_dx_block(const uint32_t *g, int64_t ldg, int64_t M, int64_t m0, int64_t npp, const uint32_t *panel,
                       int64_t ld, int64_t kb, int64_t kvalid, float *dx, int64_t K) {
  amx_bf16_dx_tiles(g, ldg, M, m0, npp, panel, ld, kb, kvalid, dx, K);
}

// ---- int8 compute with VPDPBUSD -----------------------------------------------------------------------------------
// Register-blocked with the rows of x in the vector lanes: the quantized activations are transposed once per
// call into [K/4][Mp] dwords (4 consecutive int8 of one row per dword, 16 rows per vector), each weight dword
// (4 codes of one output row, made unsigned: level + 128) is broadcast, and one VPDPBUSD adds 64 products into
// 16 rows' int32 sums. The +128 is undone by starting each block's sums at -128 * sum(x codes of the block).
// Per block, the sums are converted and scaled into float32 accumulators exactly as i8_gemm_generic does.
constexpr int kI8NR = 4;

template <int MV>
void i8_tile(const int32_t *xT, const int32_t *corr, const float *sxT, int64_t Mp, int64_t m0, int64_t M, int64_t K4,
             int64_t B4, int64_t nb, const uint8_t *wu8, int64_t ldw, const float *ws, int64_t n, int rc, int64_t N,
             float *y) {
  __m512 facc[kI8NR][MV];
  for (int j = 0; j < kI8NR; ++j)
    for (int v = 0; v < MV; ++v) facc[j][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k4a = b * B4, k4b = imin(K4, k4a + B4);
    __m512i ia[kI8NR][MV];
    for (int v = 0; v < MV; ++v) {
      const __m512i c = _mm512_loadu_si512(corr + b * Mp + m0 + 16 * v);
      for (int j = 0; j < kI8NR; ++j) ia[j][v] = c;
    }
    for (int64_t k4 = k4a; k4 < k4b; ++k4) {
      __m512i xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_si512(xT + k4 * Mp + m0 + 16 * v);
      for (int j = 0; j < kI8NR; ++j) {
        int32_t wd;
        __builtin_memcpy(&wd, wu8 + j * ldw + 4 * k4, 4);
        const __m512i wb = _mm512_set1_epi32(wd);
        for (int v = 0; v < MV; ++v) ia[j][v] = _mm512_dpbusd_epi32(ia[j][v], wb, xv[v]);
      }
    }
    for (int v = 0; v < MV; ++v) {
      const __m512 sv = _mm512_loadu_ps(sxT + b * Mp + m0 + 16 * v);
      for (int j = 0; j < kI8NR; ++j) {
        const __m512 s = _mm512_mul_ps(sv, _mm512_set1_ps(ws[j * nb + b]));
        facc[j][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[j][v]), s, facc[j][v]);
      }
    }
  }
  alignas(64) float tmp[16];
  for (int j = 0; j < rc; ++j)
    for (int v = 0; v < MV; ++v) {
      _mm512_store_ps(tmp, facc[j][v]);
      for (int l = 0; l < 16; ++l) {
        const int64_t m = m0 + 16 * v + l;
        if (m < M) y[m * N + n + j] = tmp[l];
      }
    }
}

// VPDPBUSD with the accumulator updated in place: with the intrinsic, GCC 12 copies all 16 accumulators of
// the tile below on every iteration of its inner loop (it does not coalesce the tied operand).
inline __m512i dpbusd_inplace(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// The main tile, 4 weight rows x 64 rows of x, written out with named accumulators.
#define MSBNB_I8_ROW(j, v0, v1, v2, v3)                                           \
  {                                                                              \
    int32_t wd;                                                                  \
    __builtin_memcpy(&wd, wu8 + (j) * ldw + 4 * k4, 4);                          \
    const __m512i wb = _mm512_set1_epi32(wd);                                    \
    v0 = dpbusd_inplace(v0, wb, x0);                                        \
    v1 = dpbusd_inplace(v1, wb, x1);                                        \
    v2 = dpbusd_inplace(v2, wb, x2);                                        \
    v3 = dpbusd_inplace(v3, wb, x3);                                        \
  }
#define MSBNB_I8_ACC(j, v, acc, c, sv)                                                                        \
  _mm512_store_ps(fmem[j][v], _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc, c)), _mm512_mul_ps(sv, wsj), \
                                              _mm512_load_ps(fmem[j][v])));
#define MSBNB_I8_FLUSH(j, v0, v1, v2, v3)                                                          \
  {                                                                                               \
    const __m512 wsj = _mm512_set1_ps(ws[(j) * nb + b]);                                          \
    MSBNB_I8_ACC(j, 0, v0, c0, s0)                                                                 \
    MSBNB_I8_ACC(j, 1, v1, c1, s1)                                                                 \
    MSBNB_I8_ACC(j, 2, v2, c2, s2)                                                                 \
    MSBNB_I8_ACC(j, 3, v3, c3, s3)                                                                 \
  }

void i8_tile44(const int32_t *xT, const int32_t *corr, const float *sxT, int64_t Mp, int64_t m0, int64_t M,
               int64_t K4, int64_t B4, int64_t nb, const uint8_t *wu8, int64_t ldw, const float *ws, int64_t n, int rc,
               int64_t N, float *y) {
  alignas(64) float fmem[4][4][16];  // float accumulators, touched once per block: kept in memory
  for (int j = 0; j < 4; ++j)
    for (int v = 0; v < 4; ++v) _mm512_store_ps(fmem[j][v], _mm512_setzero_ps());
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k4a = b * B4, k4b = imin(K4, k4a + B4);
    const int32_t *cb = corr + b * Mp + m0;
    // zero-initialised (starting them at c0..c3 makes GCC copy every accumulator each iteration); the
    // correction is added when the block is flushed
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m512i a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    for (int64_t k4 = k4a; k4 < k4b; ++k4) {
      const int32_t *xp = xT + k4 * Mp + m0;
      const __m512i x0 = _mm512_loadu_si512(xp), x1 = _mm512_loadu_si512(xp + 16), x2 = _mm512_loadu_si512(xp + 32),
                    x3 = _mm512_loadu_si512(xp + 48);
      MSBNB_I8_ROW(0, a00, a01, a02, a03)
      MSBNB_I8_ROW(1, a10, a11, a12, a13)
      MSBNB_I8_ROW(2, a20, a21, a22, a23)
      MSBNB_I8_ROW(3, a30, a31, a32, a33)
    }
    const __m512i c0 = _mm512_loadu_si512(cb), c1 = _mm512_loadu_si512(cb + 16), c2 = _mm512_loadu_si512(cb + 32),
                  c3 = _mm512_loadu_si512(cb + 48);
    const float *sb = sxT + b * Mp + m0;
    const __m512 s0 = _mm512_loadu_ps(sb), s1 = _mm512_loadu_ps(sb + 16), s2 = _mm512_loadu_ps(sb + 32),
                 s3 = _mm512_loadu_ps(sb + 48);
    MSBNB_I8_FLUSH(0, a00, a01, a02, a03)
    MSBNB_I8_FLUSH(1, a10, a11, a12, a13)
    MSBNB_I8_FLUSH(2, a20, a21, a22, a23)
    MSBNB_I8_FLUSH(3, a30, a31, a32, a33)
  }
  alignas(64) float tmp[16];
  (void)tmp;
  for (int j = 0; j < rc; ++j)
    for (int v = 0; v < 4; ++v)
      for (int l = 0; l < 16; ++l) {
        const int64_t m = m0 + 16 * v + l;
        if (m < M) y[m * N + n + j] = fmem[j][v][l];
      }
}
#undef MSBNB_I8_ACC
#undef MSBNB_I8_ROW
#undef MSBNB_I8_FLUSH

// One weight row as unsigned int8 levels (level + 128): 4-bit codes through a vpshufb table, int8 codes xor 0x80.
void decode_u8_row(const W4 *w4, const W8 *w8, __m256i lut, __m512i lut512, int64_t nn, int64_t K, uint8_t *out) {
  if (w4) {  // K % 32 == 0 here (aligned layout, blocksize >= 32)
    const uint8_t *row = w4->packed + nn * (K / 2);
    int64_t i = 0;
    for (; i + 2 <= K / 32; i += 2) {  // 64 codes per step
      const __m512i w16 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + 16 * i)));
      const __m512i idx = _mm512_or_si512(_mm512_srli_epi16(w16, 4),
                                          _mm512_slli_epi16(_mm512_and_si512(w16, _mm512_set1_epi16(0x0F)), 8));
      _mm512_storeu_si512(out + 32 * i, _mm512_shuffle_epi8(lut512, idx));
    }
    for (; i < K / 32; ++i) {
      const __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + 16 * i)));
      const __m256i idx = _mm256_or_si256(_mm256_srli_epi16(w16, 4),
                                          _mm256_slli_epi16(_mm256_and_si256(w16, _mm256_set1_epi16(0x0F)), 8));
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + 32 * i), _mm256_shuffle_epi8(lut, idx));
    }
  } else {
    const int8_t *row = w8->q + nn * K;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64)
      _mm512_storeu_si512(out + k, _mm512_xor_si512(_mm512_loadu_si512(row + k), _mm512_set1_epi8((char)0x80)));
    for (; k < K; ++k) out[k] = (uint8_t)(row[k] ^ (int8_t)0x80);
  }
}

// Weight rows [n0, n0 + 16) as unsigned levels, wu8 [16][ldw] (rows at or past n0 + rc repeat row n0), and
// their per-block int8-compute scales transposed, wsT [nb][16].
void decode_u8_group(const W4 *w4, const W8 *w8, __m256i lut, __m512i lut512, int64_t n0, int rc, int64_t K,
                     int64_t ldw, int64_t nb, uint8_t *wu8, float *wsT) {
  for (int r = 0; r < 16; ++r) {
    const int64_t nn = n0 + (r < rc ? r : 0);
    decode_u8_row(w4, w8, lut, lut512, nn, K, wu8 + r * ldw);
    for (int64_t b = 0; b < nb; ++b) wsT[b * 16 + r] = i8_wscale(w4, w8, nn, b);
  }
}

// Sums of the 16 lanes of each of 16 vectors, as one vector (lane j = sum of v[j]); exact in int32.
inline __m512i hsum16(const __m512i *v) {
  __m512i t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  const __m512i w0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
  const __m512i w1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, 0x88), _mm512_shuffle_i32x4(w0, w1, 0xDD));
}

// One block of 16 weight rows: their integer dot products (v, one vector of lanes per row, with the +128 offset
// of the unsigned levels) into the float accumulators, in i8_gemm_generic's order of float steps.
inline __m512 i8_block_sums(const __m512i *v, int32_t qsum, float sx, const float *ws16, __m512 facc) {
  const __m512i dot = _mm512_add_epi32(hsum16(v), _mm512_set1_epi32(-128 * qsum));
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(sx), _mm512_loadu_ps(ws16));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, facc);
}

// The first rc lanes of acc to y[0..rc).
inline void store_rows(__m512 acc, int rc, float *y) {
  alignas(64) float out[16];
  _mm512_store_ps(out, acc);
  for (int r = 0; r < rc; ++r) y[r] = out[r];
}

// Small M (1 to 4 rows of x): 16 weight rows in the lanes of the float accumulator. Per block, one vpdpbusd per
// weight row and 64 codes (k in the lanes), the 16 rows' sums gathered by hsum16, then the same per-block float
// steps as i8_gemm_generic, lane by lane (so the results are the same bits). Needs blocks of 64k elements.
void i8_small(const ActQ &a, int64_t M, int64_t K, int64_t N, const W4 *w4, const W8 *w8, float *y) {
  const int64_t nb = a.nb, B = a.B, ldw = round_up(K, 64);
  int8_t lv[16];
  alignas(16) uint8_t lut_bytes[16] = {0};
  if (w4) {
    code_levels(w4->code, lv);
    for (int i = 0; i < 16; ++i) lut_bytes[i] = (uint8_t)(lv[i] + 128);
  }
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i *>(lut_bytes)));
  const __m512i lut512 = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i *>(lut_bytes)));
  const int64_t groups = ceil_div(N, 16);
  const int64_t per_task = imax(1, ceil_div(groups, 8 * num_threads()));
  parallel_tasks(ceil_div(groups, per_task), [&](int64_t t) {
    uint8_t *wu8 = static_cast<uint8_t *>(scratch(0, (size_t)(16 * ldw) + sizeof(float) * (size_t)(16 * nb) + 64));
    float *wsT = reinterpret_cast<float *>(wu8 + 16 * ldw);  // [nb][16]
    for (int64_t g = t * per_task; g < imin(groups, (t + 1) * per_task); ++g) {
      const int64_t n0 = g * 16;
      const int rc = (int)imin(16, N - n0);
      decode_u8_group(w4, w8, lut, lut512, n0, rc, K, ldw, nb, wu8, wsT);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t *xq = a.q + m * a.Kp;
        __m512 facc = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t k0 = b * B, k1 = imin(K, k0 + B);
          __m512i v[16];
          for (int r = 0; r < 16; ++r) v[r] = _mm512_setzero_si512();
          for (int64_t k = k0; k < k1; k += 64) {
            const __m512i xv = _mm512_loadu_si512(xq + k);
            for (int r = 0; r < 16; ++r) v[r] = dpbusd_inplace(v[r], _mm512_loadu_si512(wu8 + r * ldw + k), xv);
          }
          facc = i8_block_sums(v, a.qsum[m * nb + b], a.s[m * nb + b], wsT + b * 16, facc);
        }
        store_rows(facc, rc, y + m * N + n0);
      }
    }
  });
}

// The int8-compute weight scales of row n, blocks [0, nb): i8_wscale's float operations (block_scales, then the
// factor 1/127), so the same values.
void i8_row_scales(const W4 &w, int64_t n, int64_t nb, float *out) {
  block_scales(w, n * nb, nb, out);
  for (int64_t b = 0; b < nb; ++b) out[b] = out[b] * kInv127f;
}

// One row of x (M = 1, decoding) against 4-bit weights, int8 compute: i8_small's arithmetic (the same bits),
// with the codes decoded in registers: 32 packed bytes are broadcast to both halves of a vector, the upper
// half shifted right by 4, both masked to nibbles and mapped to unsigned levels by one vpshufb, so the 64
// lanes hold the block's odd elements then its even ones; x is permuted to that order once per call.
void i8_gemv4(const ActQ &a, int64_t K, int64_t N, const W4 &w, float *y) {
  const int64_t nb = a.nb, B = a.B;
  int8_t lv[16];
  alignas(16) uint8_t lut_bytes[16];
  code_levels(w.code, lv);
  for (int i = 0; i < 16; ++i) lut_bytes[i] = (uint8_t)(lv[i] + 128);
  const __m512i lut512 = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i *>(lut_bytes)));
  int8_t *xp = static_cast<int8_t *>(scratch(6, (size_t)K + 64));
  for (int64_t c = 0; c < K; c += 64)
    for (int64_t j = 0; j < 32; ++j) {
      xp[c + j] = a.q[c + 2 * j + 1];
      xp[c + 32 + j] = a.q[c + 2 * j];
    }
  const int64_t groups = ceil_div(N, 16);
  const int64_t per_task = imax(1, ceil_div(groups, 8 * num_threads()));
  parallel_tasks(ceil_div(groups, per_task), [&](int64_t t) {
    float *wsT = static_cast<float *>(scratch(0, sizeof(float) * (size_t)(17 * nb + 16)));  // [nb][16], + a row
    float *row_s = wsT + 16 * nb;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    for (int64_t g = t * per_task; g < imin(groups, (t + 1) * per_task); ++g) {
      const int64_t n0 = g * 16;
      const int rc = (int)imin(16, N - n0);
      const uint8_t *rows[16];
      for (int r = 0; r < 16; ++r) {
        const int64_t nn = n0 + (r < rc ? r : 0);
        rows[r] = w.packed + nn * (K / 2);
        i8_row_scales(w, nn, nb, row_s);
        for (int64_t b = 0; b < nb; ++b) wsT[b * 16 + r] = row_s[b];
      }
      __m512 facc = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * B, k1 = imin(K, k0 + B);
        __m512i v[16];
        for (int r = 0; r < 16; ++r) v[r] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k1; k += 64) {
          const __m512i xv = _mm512_loadu_si512(xp + k);
          for (int r = 0; r < 16; ++r) {
            if ((k & 127) == 0) prefetch_next_group(rows[r] + k / 2, 16 * (K / 2));
            const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(rows[r] + k / 2)));
            const __m512i codes = _mm512_and_si512(_mm512_mask_srli_epi16(bytes, (__mmask32)0xFFFF0000u, bytes, 4), nib);
            v[r] = dpbusd_inplace(v[r], _mm512_shuffle_epi8(lut512, codes), xv);
          }
        }
        facc = i8_block_sums(v, a.qsum[b], a.s[b], wsT + b * 16, facc);
      }
      store_rows(facc, rc, y + n0);
    }
  });
}

void i8_gemm_rows(const ActQ &a, int64_t M, int64_t K, int64_t N, const W4 *w4, const W8 *w8, float *y);

// Blocks of 128 rows of x, so that the transposed activations of a block (K/4 x 128 dwords: 512 KB at
// K = 4096) stay in L2 while every weight row passes over them; the weights are decoded once per block.
constexpr int64_t kI8MB = 128;
void i8_gemm(const ActQ &a, int64_t M, int64_t K, int64_t N, const W4 *w4, const W8 *w8, float *y) {
  if (M == 1 && w4 && a.B % 64 == 0 && K % 64 == 0) return i8_gemv4(a, K, N, *w4, y);
  if (M <= 4 && a.B % 64 == 0 && K % 64 == 0) return i8_small(a, M, K, N, w4, w8, y);
  for (int64_t mb0 = 0; mb0 < M; mb0 += kI8MB) {
    ActQ part = a;
    part.q = a.q + mb0 * a.Kp;
    part.s = a.s + mb0 * a.nb;
    part.qsum = a.qsum + mb0 * a.nb;
    i8_gemm_rows(part, imin(kI8MB, M - mb0), K, N, w4, w8, y + mb0 * N);
  }
}

// int8 compute on AMX tiles (tdpbusd), for blocks and K in whole 64-element steps: per block, the unsigned weight
// levels of 16 rows (A) times 16 rows of x as transposed dwords (B) give the block's exact integer sums; they
// are then offset, converted, scaled and accumulated in the same float steps as i8_gemm_generic, so the same bits.
bool amx_int8_ready() { return amx_int8_enabled(); }

MSBNB_AMX_INT8_TARGET void i8_amx_group(const int32_t *xT, const int32_t *corr, const float *sxT, int64_t Mp, int64_t M,
                                        int64_t K, int64_t B, int64_t nb, const uint8_t *wu8, int64_t ldw,
                                        const float *wsT, int64_t n0, int rc, int64_t N, float *y) {
  amx_load_tiles(3);
  alignas(64) int32_t c[16][16];
  alignas(64) float out[16][16];
  for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
    __m512 facc[16];
    for (int r = 0; r < 16; ++r) facc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * B, k1 = imin(K, k0 + B);
      _tile_zero(0);
      for (int64_t k = k0; k < k1; k += 64) {
        _tile_loadd(1, wu8 + k, ldw);
        _tile_loadd(2, xT + (k / 4) * Mp + m0, Mp * (int64_t)sizeof(int32_t));
        _tile_dpbusd(0, 1, 2);
      }
      _tile_stored(0, c, 64);
      const __m512i cv = _mm512_loadu_si512(corr + b * Mp + m0);
      const __m512 sv = _mm512_loadu_ps(sxT + b * Mp + m0);
      for (int r = 0; r < 16; ++r) {
        const __m512i dot = _mm512_add_epi32(_mm512_load_si512(c[r]), cv);
        const __m512 sc = _mm512_mul_ps(sv, _mm512_set1_ps(wsT[b * 16 + r]));
        facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, facc[r]);
      }
    }
    for (int r = 0; r < 16; ++r) _mm512_store_ps(out[r], facc[r]);
    for (int r = 0; r < rc; ++r)
      for (int j = 0; j < 16 && m0 + j < M; ++j) y[(m0 + j) * N + n0 + r] = out[r][j];
  }
  _tile_release();
}

void i8_gemm_rows(const ActQ &a, int64_t M, int64_t K, int64_t N, const W4 *w4, const W8 *w8, float *y) {
  const int64_t Mp = round_up(M, 16), K4 = ceil_div(K, 4), nb = a.nb, B4 = a.B / 4;
  const size_t xbytes = sizeof(int32_t) * (size_t)(K4 * Mp), cbytes = sizeof(int32_t) * (size_t)(nb * Mp);
  char *mem = static_cast<char *>(scratch(3, xbytes + 2 * cbytes + 64));
  int32_t *xT = reinterpret_cast<int32_t *>(mem);
  int32_t *corr = reinterpret_cast<int32_t *>(mem + xbytes);
  float *sxT = reinterpret_cast<float *>(mem + xbytes + cbytes);
  parallel_tasks(Mp / 16, [&](int64_t t) {
    const int64_t m0 = t * 16;
    for (int64_t k4 = 0; k4 < K4; ++k4)
      for (int64_t m = m0; m < m0 + 16; ++m) {
        int32_t v = 0;
        if (m < M) __builtin_memcpy(&v, a.q + m * a.Kp + 4 * k4, 4);
        xT[k4 * Mp + m] = v;
      }
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t m = m0; m < m0 + 16; ++m) {
        corr[b * Mp + m] = m < M ? -128 * a.qsum[m * nb + b] : 0;
        sxT[b * Mp + m] = m < M ? a.s[m * nb + b] : 0.f;
      }
  });
  int8_t lv[16];
  alignas(16) uint8_t lut_bytes[16];
  if (w4) {
    code_levels(w4->code, lv);
    for (int i = 0; i < 16; ++i) lut_bytes[i] = (uint8_t)(lv[i] + 128);
  }
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i *>(lut_bytes)));
  const __m512i lut512 = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i *>(lut_bytes)));
  const int64_t ldw = round_up(K4 * 4, 64);
  if (a.B % 64 == 0 && K % 64 == 0 && amx_int8_ready()) {
    const int64_t groups = ceil_div(N, 16), per_task = imax(1, ceil_div(groups, 4 * num_threads()));
    parallel_tasks(ceil_div(groups, per_task), [&](int64_t t) {
      uint8_t *wu8 = static_cast<uint8_t *>(scratch(0, (size_t)(16 * ldw) + sizeof(float) * (size_t)(16 * nb)));
      float *wsT = reinterpret_cast<float *>(wu8 + 16 * ldw);  // [nb][16]
      for (int64_t g = t * per_task; g < imin(groups, (t + 1) * per_task); ++g) {
        const int64_t n0 = g * 16;
        const int rc = (int)imin(16, N - n0);
        decode_u8_group(w4, w8, lut, lut512, n0, rc, K, ldw, nb, wu8, wsT);
        i8_amx_group(xT, corr, sxT, Mp, M, K, a.B, nb, wu8, ldw, wsT, n0, rc, N, y);
      }
    });
    return;
  }
  const int64_t per_task = imax(kI8NR, round_up(ceil_div(N, 8 * num_threads()), kI8NR));
  parallel_tasks(ceil_div(N, per_task), [&](int64_t t) {
    const int64_t n0 = t * per_task, n1 = imin(N, n0 + per_task);
    uint8_t *wu8 = static_cast<uint8_t *>(scratch(0, (size_t)(kI8NR * ldw) + sizeof(float) * (size_t)(kI8NR * nb)));
    float *ws = reinterpret_cast<float *>(wu8 + kI8NR * ldw);
    for (int64_t n = n0; n < n1; n += kI8NR) {
      const int rc = (int)imin(kI8NR, n1 - n);
      for (int r = 0; r < kI8NR; ++r) {
        const int64_t nn = n + (r < rc ? r : 0);
        uint8_t *out = wu8 + r * ldw;
        decode_u8_row(w4, w8, lut, lut512, nn, K, out);
        for (int64_t k = K; k < K4 * 4; ++k) out[k] = 0x80;
        for (int64_t b = 0; b < nb; ++b) ws[r * nb + b] = i8_wscale(w4, w8, nn, b);
      }
      int64_t m0 = 0;
      for (; m0 + 64 <= Mp; m0 += 64) i8_tile44(xT, corr, sxT, Mp, m0, M, K4, B4, nb, wu8, ldw, ws, n, rc, N, y);
      for (; m0 + 32 <= Mp; m0 += 32) i8_tile<2>(xT, corr, sxT, Mp, m0, M, K4, B4, nb, wu8, ldw, ws, n, rc, N, y);
      if (m0 < Mp) i8_tile<1>(xT, corr, sxT, Mp, m0, M, K4, B4, nb, wu8, ldw, ws, n, rc, N, y);
    }
  });
}

bool fast_linear4bit(const float *x, int64_t M, const W4 &w, const float *bias, float *y) {
  const bool pow2 = (w.bs & (w.bs - 1)) == 0;
  // whole 128-weight chunks, plus a last half chunk when it holds whole blocks (blocks of 32 or 64)
  const bool shape_ok = w.K % 128 == 0 || (w.K % 64 == 0 && w.bs <= 64);
  if (M < 1 || M > 4 || w.N < 1 || !shape_ok || !pow2 || w.bs < 32 || w.K % w.bs) return false;
  const int64_t K = w.K, tail0 = K / 128 * 128;
  float *xp = static_cast<float *>(scratch(2, sizeof(float) * (size_t)(M * K)));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < tail0; c += 128)
      for (int s = 0; s < 8; ++s)
        for (int j = 0; j < 16; ++j) xp[m * K + c + s * 16 + j] = x[m * K + c + 8 * j + kPlanePos[s]];
    for (int64_t k = tail0; k < K; ++k) xp[m * K + k] = x[m * K + k];
  }
  float *x2p = nullptr;  // pairs of rows (pair_rows) when rows end in a half chunk
  if (tail0 != K) {
    x2p = static_cast<float *>(scratch(3, sizeof(float) * (size_t)(2 * M * K)));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < 2 * K; c += 128)
        for (int s = 0; s < 8; ++s)
          for (int j = 0; j < 16; ++j) {
            const int64_t k = c + 8 * j + kPlanePos[s];
            x2p[m * 2 * K + c + s * 16 + j] = x[m * K + (k < K ? k : k - K)];
          }
  }
  // pair_rows keeps four independent chains of partial sums: four pairs at M = 1, two at M = 2
  switch (M) {
    case 1: planes<1, 4, 4>(xp, x2p, w, bias, y); break;
    case 2: planes<2, 4, 2>(xp, x2p, w, bias, y); break;
    case 3: planes<3, 2, 1>(xp, x2p, w, bias, y); break;
    default: planes<4, 2, 1>(xp, x2p, w, bias, y); break;
  }
  return true;
}


// ---- bf16 compute, one row of x (the decode GEMV) ----------------------------------------------------------------
// The operands of linear4bit_bf16 (x and fl(code * scale) rounded to bf16), summed in the nibble-plane order of
// `planes`: 64 packed bytes viewed as 32 words hold 4 codes each; shifting every word right by 4*s (s = 0..3)
// puts one code in its low 4 bits (word j of plane s is weight 4j + kBf16PlanePos[s] of the 128-weight chunk),
// one ternary-logic op keeps those bits and sets bit 4 for the chunk's second 64 weights, and vpermw picks the
// weight from a 32-word table: the 16 code values times the scale of the chunk's first 64 weights, then of its
// last 64, rounded to bf16 (vcvtne2ps2bf16). vdpbf16ps lane i then takes weights 8i + pos (odd word) and
// 8i + 4 + pos (even word), so x is rounded and permuted once per call to match. Per 128 weights: one load,
// 3 shifts, 4 selects, 4 permutes and 4 dot products, against 23 float32 operations in `planes`: about 1.6x
// the weights per second. Without AVX512-BF16 the same steps are emulated (the table rounded as bf16_round
// does, each dot product as two FMAs in vdpbf16ps' order), so both give the same bits.
const int kBf16PlanePos[4] = {1, 0, 3, 2};

struct Bf16Native {
  static MSBNB_BF16_TARGET inline __m512i pack(__m512 first, __m512 second) {  // 32 bf16: first, then second
    return (__m512i)_mm512_cvtne2ps_pbh(second, first);
  }
  static MSBNB_BF16_TARGET inline __m512 dot(__m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
  }
};

struct Bf16Emulated {
  static inline __m256i round16(__m512 f) {  // bf16_round, 16 lanes
    const __m512i u = _mm512_castps_si512(f), top = _mm512_srli_epi32(u, 16);
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), _mm512_and_si512(top, _mm512_set1_epi32(1))),
        16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    const __mmask16 tiny = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7F800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(top, _mm512_set1_epi32(0x40)));
    r = _mm512_mask_mov_epi32(r, tiny, _mm512_and_si512(top, _mm512_set1_epi32(0x8000)));
    return _mm512_cvtepi32_epi16(r);
  }
  static inline __m512i pack(__m512 first, __m512 second) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(round16(first)), round16(second), 1);
  }
  static inline __m512 dot(__m512 acc, __m512i w, __m512i x) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, hi)), xo = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), xe = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    return _mm512_fmadd_ps(we, xe, _mm512_fmadd_ps(wo, xo, acc));
  }
};

// Rows [n0, n1) of y = x @ W^T + bias for one row x, its bf16 values permuted into xq (see above). Symmetric
// codes, power-of-two blocks of 64 or more, K a multiple of 64 (a last half chunk when K % 128 == 64).
template <class P, int R>
MSBNB_BF16_TARGET void bf16_planes_rows(const uint16_t *xq, const W4 &w, int64_t n0, int64_t n1, const float *bias,
                                        float *y) {
  const int64_t K = w.K, bs = w.bs, bpr = K / bs, nchunks = ceil_div(K, 128);
  const __m512 code = _mm512_loadu_ps(w.code);
  const __m512i nibble = _mm512_set1_epi16(0xF);
  const __m512i second = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
  float *scales = static_cast<float *>(scratch(0, sizeof(float) * (size_t)(R * bpr + 16)));
  for (int64_t n = n0; n < n1; n += R) {
    const int rc = (int)imin(R, n1 - n);
    const uint8_t *rows[R];
    int64_t row[R];
    row_group<R>(w, n, rc, rows, row, scales);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nchunks; ++c) {
      const bool half = c * 128 + 128 > K;  // its last 64 weights do not exist: no bytes, x and scale zero
      __m512i v[R], t[R];
      for (int r = 0; r < R; ++r) {
        prefetch_next_group(rows[r] + c * 64, R * (K / 2));
        v[r] = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, rows[r] + c * 64) : _mm512_loadu_si512(rows[r] + c * 64);
        const float s0 = scales[r * bpr + c * 128 / bs], s1 = half ? 0.f : scales[r * bpr + (c * 128 + 64) / bs];
        t[r] = P::pack(_mm512_mul_ps(code, _mm512_set1_ps(s0)), _mm512_mul_ps(code, _mm512_set1_ps(s1)));
      }
      for (int s = 0; s < 4; ++s) {
        const __m512i xv = _mm512_loadu_si512(xq + c * 128 + s * 32);
        for (int r = 0; r < R; ++r) {
          const __m512i shifted = s ? _mm512_srli_epi16(v[r], 4 * s) : v[r];
          const __m512i idx = _mm512_ternarylogic_epi32(shifted, nibble, second, 0xEA);  // (a & b) | c
          acc[r] = P::dot(acc[r], _mm512_permutexvar_epi16(idx, t[r]), xv);
        }
      }
    }
    for (int r = 0; r < rc; ++r) y[n + r] = _mm512_reduce_add_ps(acc[r]) + (bias ? bias[n + r] : 0.f);
  }
}

// The bf16 GEMVs' rows in tasks over the threads: rows(steps, n0, n1) computes rows [n0, n1) with `steps`
// Bf16Native or Bf16Emulated (the same bits), kBf16GemvRows side by side (8 measured no faster from DRAM).
constexpr int kBf16GemvRows = 4;
template <class Rows>
void bf16_gemv_tasks(int64_t N, int64_t K, Rows rows) {
  const bool native = bf16_native_enabled();
  const int64_t per_task = gemv_rows_per_task(N, K, kBf16GemvRows, 16);
  parallel_tasks(ceil_div(N, per_task), [&](int64_t t) {
    const int64_t n0 = t * per_task, n1 = imin(N, n0 + per_task);
    if (native)
      rows(Bf16Native{}, n0, n1);
    else
      rows(Bf16Emulated{}, n0, n1);
  });
}

bool fast_linear4bit_bf16(const float *x, int64_t M, const W4 &w, const float *bias, float *y) {
  const bool pow2 = (w.bs & (w.bs - 1)) == 0;
  if (M != 1 || w.N < 1 || w.K < 1 || w.block_offset || !pow2 || w.bs < 64 || w.K % w.bs || w.K % 64) return false;
  const int64_t K = w.K, Kp = round_up(K, 128);
  uint16_t *xq = static_cast<uint16_t *>(scratch(2, sizeof(uint16_t) * (size_t)Kp));
  for (int64_t c = 0; c < Kp; c += 128)
    for (int s = 0; s < 4; ++s)
      for (int j = 0; j < 32; ++j) {
        const int64_t k = c + 4 * j + kBf16PlanePos[s];
        xq[c + s * 32 + j] = k < K ? bf16_round(x[k]) : 0;
      }
  bf16_gemv_tasks(w.N, K, [&](auto steps, int64_t n0, int64_t n1) {
    bf16_planes_rows<decltype(steps), kBf16GemvRows>(xq, w, n0, n1, bias, y);
  });
  return true;
}

// Whole blocks [k0, k1) of row n of an aligned symmetric 4-bit weight, decoded straight to bf16 for the panel
// GEMM: per block, the 16 code values times the scale rounded to bf16 (twice, as vpermw reads 5 index bits);
// per 32 weights, 16 bytes widened so that dword i holds byte i in both words, the even word shifted right by
// 4 (element 2i, the high nibble) and the odd one not (element 2i + 1: the low nibble, plus one bit that the
// doubled table ignores), one vpermw. The same values as decode4_aligned + bf16_round_n, at ~5 operations
// per 32 weights instead of ~4 per 16 plus the rounding.
template <class P>
MSBNB_BF16_TARGET void decode4_bf16_blocks(const W4 &w, int64_t n, int64_t k0, int64_t k1, uint16_t *out) {
  const uint8_t *row = w.packed + (n * w.K) / 2;
  const int64_t first = n * (w.K / w.bs);
  const __m512 code = _mm512_loadu_ps(w.code);
  const __m512i high_even = _mm512_set1_epi32(4);  // word shifts (4, 0, 4, 0, ...)
  for (int64_t k = k0; k < k1; k += w.bs) {
    const __m512 c = _mm512_mul_ps(code, _mm512_set1_ps(w.scale(first + k / w.bs)));
    const __m512i t = P::pack(c, c);
    for (int64_t j = k; j < k + w.bs; j += 32) {
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + j / 2)));
      const __m512i idx = _mm512_srlv_epi16(_mm512_or_si512(d, _mm512_slli_epi32(d, 16)), high_even);
      _mm512_storeu_si512(out + (j - k0), _mm512_permutexvar_epi16(idx, t));
    }
  }
}

bool decode4_bf16(const W4 &w, int64_t n, int64_t k0, int64_t k1, uint16_t *out) {
  if (w.block_offset || w.bs % 32 || k0 % w.bs || (k1 - k0) % w.bs) return false;
  prefetch_ahead(w, n, k0, k1);
  if (bf16_native_enabled())
    decode4_bf16_blocks<Bf16Native>(w, n, k0, k1, out);
  else
    decode4_bf16_blocks<Bf16Emulated>(w, n, k0, k1, out);
  return true;
}

// Rows [k0, k1) of int8 weight row n as bf16 for the panel GEMM: fl(fl(q - offset) * scale) rounded, as
// decode8 + bf16_round_n give them, 32 at a time.
template <class P>
MSBNB_BF16_TARGET inline __m512i decode8_bf16_32(const int8_t *q, __m512 o, __m512 s) {
  const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q))));
  const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + 16))));
  return P::pack(_mm512_mul_ps(_mm512_sub_ps(a, o), s), _mm512_mul_ps(_mm512_sub_ps(b, o), s));
}

template <class P>
MSBNB_BF16_TARGET void decode8_bf16_row(const W8 &w, int64_t n, int64_t k0, int64_t k1, uint16_t *out) {
  const int8_t *row = w.q + n * w.K;
  const __m512 s = _mm512_set1_ps(w.s(n)), o = _mm512_set1_ps(w.o(n));
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) _mm512_storeu_si512(out + (k - k0), decode8_bf16_32<P>(row + k, o, s));
  for (; k < k1; ++k) out[k - k0] = bf16_round(((float)row[k] - w.o(n)) * w.s(n));
}

bool decode8_bf16(const W8 &w, int64_t n, int64_t k0, int64_t k1, uint16_t *out) {
  prefetch_ahead(w, n, k0, k1);
  if (bf16_native_enabled())
    decode8_bf16_row<Bf16Native>(w, n, k0, k1, out);
  else
    decode8_bf16_row<Bf16Emulated>(w, n, k0, k1, out);
  return true;
}

// One row of x times an int8 weight in bf16, without a panel: the weights decoded in registers 32 at a time and
// summed exactly as panel_gemm_bf16's micro-kernel sums them (lane i takes elements 2i + 1 and 2i of every 32,
// chunks of the same depth, weights beyond K zero, each chunk's lanes summed into y = bias): the same bits as
// the panel path, without writing and reading back a bf16 copy of every weight.
template <class P, int R>
MSBNB_BF16_TARGET void gemv8_bf16_rows(const uint16_t *xb, int64_t kc, const W8 &w, int64_t n0, int64_t n1,
                                       float *y) {
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; n += R) {
    const int rc = (int)imin(R, n1 - n);
    const int8_t *rows[R];
    __m512 s[R], o[R];
    for (int r = 0; r < R; ++r) {
      const int64_t nn = n + (r < rc ? r : 0);
      rows[r] = w.q + nn * K;
      s[r] = _mm512_set1_ps(w.s(nn));
      o[r] = _mm512_set1_ps(w.o(nn));
    }
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t k1 = imin(K, k0 + kc);
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; k += 32) {
        const __m512i xv = _mm512_loadu_si512(xb + k);
        if (k + 32 <= k1) {
          for (int r = 0; r < R; ++r) {
            if ((k & 63) == 0) prefetch_next_group(rows[r] + k, R * K);
            acc[r] = P::dot(acc[r], decode8_bf16_32<P>(rows[r] + k, o[r], s[r]), xv);
          }
        } else {  // the last partial step: the panel holds zeros beyond K
          const int64_t rem = k1 - k;
          const __mmask32 m = (__mmask32)((1ull << rem) - 1ull);
          alignas(64) int8_t tail[32] = {0};
          for (int r = 0; r < R; ++r) {
            __builtin_memcpy(tail, rows[r] + k, (size_t)rem);
            acc[r] = P::dot(acc[r], _mm512_maskz_mov_epi16(m, decode8_bf16_32<P>(tail, o[r], s[r])), xv);
          }
        }
      }
      for (int r = 0; r < rc; ++r) y[n + r] += _mm512_reduce_add_ps(acc[r]);
    }
  }
}

bool fast_linear8bit_bf16(const float *x, int64_t M, const W8 &w, const float *bias, float *y) {
  if (M != 1 || w.N < 1 || w.K < 1) return false;
  const int64_t K = w.K, Kp = round_up(K, kBf16Pad);
  init_output(y, 1, w.N, bias);
  uint16_t *xb = static_cast<uint16_t *>(scratch(2, sizeof(uint16_t) * (size_t)Kp));
  bf16_round_n(x, K, xb);
  for (int64_t k = K; k < Kp; ++k) xb[k] = 0;
  const int64_t kc = imin(kPanelK, K);  // panel_gemm_bf16's chunk depth for kstep = 1
  bf16_gemv_tasks(w.N, K, [&](auto steps, int64_t n0, int64_t n1) {
    gemv8_bf16_rows<decltype(steps), kBf16GemvRows>(xb, kc, w, n0, n1, y);
  });
  return true;
}

}  // namespace

}  // namespace isa_avx512

const KernelTable kTableAvx512 = isa_avx512::kTable;

}  // namespace msbnb
