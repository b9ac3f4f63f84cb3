// Kernels for x86-64 with AVX2 and FMA (no AVX-512 or no VNNI).
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#include "msbnb.h"

namespace msbnb {
namespace isa_avx2 {
namespace {

const char *const kIsaName = "avx2";
constexpr int VW = 8;
constexpr int kFusedRows = 2;
typedef __m256 VF;

inline VF vzero() { return _mm256_setzero_ps(); }
inline VF vset1(float v) { return _mm256_set1_ps(v); }
inline VF vload(const float *p) { return _mm256_loadu_ps(p); }
inline void vstore(float *p, VF v) { _mm256_storeu_ps(p, v); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline float vsum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline VF vload_n(const float *p, int n) {
  const __m256i idx = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
  return _mm256_maskload_ps(p, mask);
}

struct Lut {
  __m256 lo, hi;
};
inline Lut make_lut(const float *code, float s, float off, bool asym) {
  const __m256 sv = _mm256_set1_ps(s);
  __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(code), sv), hi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), sv);
  if (asym) {
    lo = _mm256_add_ps(lo, _mm256_set1_ps(off));
    hi = _mm256_add_ps(hi, _mm256_set1_ps(off));
  }
  return Lut{lo, hi};
}
inline VF lut_decode(const Lut &l, const uint8_t *p) {
  int32_t raw;
  __builtin_memcpy(&raw, p, 4);
  const __m128i b = _mm_cvtsi32_si128(raw);
  __m256i v = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
  v = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4)), _mm256_set1_epi32(15));
  const __m256 lo = _mm256_permutevar8x32_ps(l.lo, v), hi = _mm256_permutevar8x32_ps(l.hi, v);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, _mm256_set1_epi32(7))));
}
inline VF load_i8(const int8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))));
}

// int8 x int8: sign-extend to 16 bits and VPMADDWD (exact; no saturation).
constexpr int64_t I8_STEP = 16;
constexpr int32_t I8_W_OFFSET = 0;

template <int MR, int NR>
void i8_micro(const int8_t *x, int64_t ldx, const int8_t *w, int64_t K, int32_t (*acc)[4]) {
  __m256i a[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) a[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i xv[MR];
    for (int i = 0; i < MR; ++i)
      xv[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(x + i * ldx + k)));
    for (int j = 0; j < NR; ++j) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + j * K + k)));
      for (int i = 0; i < MR; ++i) a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(xv[i], wv));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a[i][j]), _mm256_extracti128_si256(a[i][j], 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      int32_t total = _mm_cvtsi128_si32(s);
      for (int64_t kk = k; kk < K; ++kk) total += (int32_t)x[i * ldx + kk] * (int32_t)w[j * K + kk];
      acc[i][j] = total;
    }
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


#include "quant_scalar.inc"
inline float absmax_n(const float *p, int64_t n, int64_t *bad) { return absmax_n_scalar(p, n, bad); }
inline void minmax_n(const float *p, int64_t n, float *lo, float *hi, int64_t *bad) {
  minmax_n_scalar(p, n, lo, hi, bad);
}
inline void index_pack(const float *p, int64_t n, bool divide, float factor, float mid, const float *bounds,
                       const uint8_t *order, uint8_t *out) {
  index_pack_scalar(p, n, divide, factor, mid, bounds, order, out);
}

}  // namespace

#include "impl_common.inc"

namespace {
BV bload(const uint16_t *p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
  return BV{_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u))),
            _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))};
}
const MicroBf16Fn *bf16_native_micro() { return nullptr; }
bool amx_ready() { return false; }
void amx_bf16_dx_block(const uint32_t *, int64_t, int64_t, int64_t, int64_t, const uint32_t *, int64_t, int64_t, int64_t,
                       float *, int64_t) {}
void amx_bf16_panel(const uint32_t *, int64_t, int64_t, const uint16_t *, int64_t, int64_t, int64_t, int64_t, float *,
                    int64_t) {}
void i8_gemm(const ActQ &a, int64_t M, int64_t K, int64_t N, const W4 *w4, const W8 *w8, float *y) {
  i8_gemm_generic(a, M, K, N, w4, w8, y);
}
bool fast_linear4bit(const float *, int64_t, const W4 &, const float *, float *) { return false; }
bool fast_linear4bit_bf16(const float *, int64_t, const W4 &, const float *, float *) { return false; }
bool decode4_bf16(const W4 &, int64_t, int64_t, int64_t, uint16_t *) { return false; }
bool fast_linear8bit_bf16(const float *, int64_t, const W8 &, const float *, float *) { return false; }
bool decode8_bf16(const W8 &, int64_t, int64_t, int64_t, uint16_t *) { return false; }
const DxBf16Fn *dx_bf16_native_tiles() { return nullptr; }
float quantize_row_fast(const float *x, int64_t K, const uint8_t *outlier, float threshold, int8_t *q,
                        int32_t *qsum) {
  return quantize_row(x, K, outlier, threshold, q, qsum);
}
}  // namespace

}  // namespace isa_avx2

const KernelTable kTableAvx2 = isa_avx2::kTable;

}  // namespace msbnb
