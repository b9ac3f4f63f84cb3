// Portable C++ kernels (any CPU): plain loops over 8-float groups that compilers vectorise for the
// baseline instruction set.
#include "msbnb.h"

namespace msbnb {
namespace isa_portable {
namespace {

const char *const kIsaName = "portable";
constexpr int VW = 8;
constexpr int kFusedRows = 2;
struct VF {
  float v[VW];
};

inline VF vzero() {
  VF r;
  for (int i = 0; i < VW; ++i) r.v[i] = 0.f;
  return r;
}
inline VF vset1(float x) {
  VF r;
  for (int i = 0; i < VW; ++i) r.v[i] = x;
  return r;
}
inline VF vload(const float *p) {
  VF r;
  for (int i = 0; i < VW; ++i) r.v[i] = p[i];
  return r;
}
inline void vstore(float *p, VF a) {
  for (int i = 0; i < VW; ++i) p[i] = a.v[i];
}
inline VF vfma(VF a, VF b, VF c) {
  for (int i = 0; i < VW; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline VF vadd(VF a, VF b) {
  for (int i = 0; i < VW; ++i) a.v[i] += b.v[i];
  return a;
}
inline VF vsub(VF a, VF b) {
  for (int i = 0; i < VW; ++i) a.v[i] -= b.v[i];
  return a;
}
inline VF vmul(VF a, VF b) {
  for (int i = 0; i < VW; ++i) a.v[i] *= b.v[i];
  return a;
}
inline float vsum(VF a) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += a.v[i];
  return s;
}
inline VF vload_n(const float *p, int n) {
  VF r = vzero();
  for (int i = 0; i < n; ++i) r.v[i] = p[i];
  return r;
}

struct Lut {
  float t[16];
};
inline Lut make_lut(const float *code, float s, float off, bool asym) {
  Lut l;
  for (int i = 0; i < 16; ++i) {
    float v = code[i] * s;
    if (asym) v = v + off;
    l.t[i] = v;
  }
  return l;
}
inline VF lut_decode(const Lut &l, const uint8_t *p) {
  VF r;
  for (int i = 0; i < VW / 2; ++i) {
    r.v[2 * i] = l.t[p[i] >> 4];
    r.v[2 * i + 1] = l.t[p[i] & 0x0F];
  }
  return r;
}
inline VF load_i8(const int8_t *p) {
  VF r;
  for (int i = 0; i < VW; ++i) r.v[i] = (float)p[i];
  return r;
}

constexpr int64_t I8_STEP = 8;
constexpr int32_t I8_W_OFFSET = 0;
inline void i8_block(const int8_t *x, int64_t ldx, int mr, const int8_t *w, int64_t K, int nr, int32_t (*acc)[4]) {
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      int32_t s = 0;
      const int8_t *xr = x + i * ldx, *wr = w + j * K;
      for (int64_t k = 0; k < K; ++k) s += (int32_t)xr[k] * (int32_t)wr[k];
      acc[i][j] = s;
    }
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
// Each pair of bf16 values read as one 32-bit word (x86-64 is little-endian: element 2i in the low half), as
// the AVX2 version does. The obvious per-element form (p[2i + 1] and p[2i] through bf16_to_float) is
// miscompiled by GCC 12's loop vectorizer at -O3: some even elements were counted twice (the bf16 test at
// K = 1088 caught it).
BV bload(const uint16_t *p) {
  BV r;
  for (int i = 0; i < VW; ++i) {
    uint32_t pair;
    __builtin_memcpy(&pair, p + 2 * i, 4);
    const uint32_t o = pair & 0xFFFF0000u, e = pair << 16;
    __builtin_memcpy(&r.o.v[i], &o, 4);
    __builtin_memcpy(&r.e.v[i], &e, 4);
  }
  return r;
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

}  // namespace isa_portable

const KernelTable kTablePortable = isa_portable::kTable;

}  // namespace msbnb
