// The library's entry points: MindSpore aot kernels (with their C++ shape inference for dynamic shapes)
// and plain C functions for ctypes (quantizers, thread and instruction-set control).
//
// Every aot entry checks the count, dtypes and sizes of what MindSpore hands it before touching a byte,
// so a mismatched call fails with an error code (and a message from msbnb_last_error()) instead of
// reading out of bounds.
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "msbnb.h"

#define MSBNB_EXPORT extern "C" __attribute__((visibility("default")))

namespace msbnb {
namespace {

char g_error[512] = "";  // last failure, from whichever thread MindSpore launched the kernel on

int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int fail(int code, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_error, sizeof(g_error), fmt, args);
  va_end(args);
  return code;
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512bf16() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}

// Intel AMX: tiles (AMX-TILE, CPUID leaf 7 EDX bit 24) with bf16 (bit 22) or int8 (bit 25) products, the tile
// state enabled in XCR0, usable once Linux grants this process the tile data state (arch_prctl
// ARCH_REQ_XCOMP_PERM, Linux >= 5.16; asked once).
bool amx_tiles_granted() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!cpu_has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24))) return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}
bool cpu_has_amx_feature(int bit) {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << bit)) && amx_tiles_granted();
}
bool amx_bf16_usable() { return cpu_has_avx512bf16() && cpu_has_amx_feature(22); }
bool amx_int8_usable() { return cpu_has_amx_feature(25); }
const KernelTable *best_table() {
  if (cpu_has_avx512()) return &kTableAvx512;
  if (cpu_has_avx2()) return &kTableAvx2;
  return &kTablePortable;
}

std::atomic<const KernelTable *> g_table{nullptr};

const KernelTable &table() {
  const KernelTable *t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}
bool is(const char *dtype, const char *name) { return std::strcmp(dtype, name) == 0; }

// ---- float16 <-> float32 (only for float16 activations; not a hot path) ------------------------------------
float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        exp--;
      }
      bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const int32_t exp = (int32_t)((x >> 23) & 0xFF) - 127 + 15;
  uint32_t mant = x & 0x7FFFFF;
  if (((x >> 23) & 0xFF) == 0xFF) return (uint16_t)(sign | 0x7C00 | (mant ? 0x200 : 0));
  if (exp >= 31) return (uint16_t)(sign | 0x7C00);
  if (exp <= 0) {
    if (exp < -10) return (uint16_t)sign;
    mant |= 0x800000;
    const int shift = 14 - exp;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) h++;
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((uint32_t)exp << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
  return (uint16_t)(sign | h);
}

// Activations arrive as float32 or float16; the kernels work in float32.
const float *input_f32(void *p, const char *dtype, int64_t n, int slot) {
  if (is(dtype, "float32")) return static_cast<const float *>(p);
  float *buf = static_cast<float *>(scratch(slot, sizeof(float) * (size_t)(n > 0 ? n : 1)));
  const uint16_t *h = static_cast<const uint16_t *>(p);
  for (int64_t i = 0; i < n; ++i) buf[i] = half_to_float(h[i]);
  return buf;
}
float *output_f32(void *p, const char *dtype, int64_t n, int slot) {
  if (is(dtype, "float32")) return static_cast<float *>(p);
  return static_cast<float *>(scratch(slot, sizeof(float) * (size_t)(n > 0 ? n : 1)));
}
void finish_output(void *p, const char *dtype, const float *buf, int64_t n) {
  if (is(dtype, "float32")) return;
  uint16_t *h = static_cast<uint16_t *>(p);
  for (int64_t i = 0; i < n; ++i) h[i] = float_to_half(buf[i]);
}
bool is_float_act(const char *dtype) { return is(dtype, "float32") || is(dtype, "float16"); }

// ---- 4-bit argument parsing (shared by forward and dx) -------------------------------------------------------
// inputs from `first`: packed, absmax, code, nested_absmax, nested_code, nested_offset, block_offset; meta at META
int parse_w4(void **params, int *ndims, int64_t **shapes, const char **dtypes, int first, int META, int64_t N, W4 *w,
             int64_t *flags) {
  const int P = first, A = first + 1, C = first + 2, NA = first + 3, NC = first + 4, NO = first + 5, BO = first + 6;
  if (!is(dtypes[META], "int64") || numel(ndims[META], shapes[META]) < 4)
    return fail(3, "meta must be int64 [4] (K, blocksize, nested_blocksize, flags), got %s", dtypes[META]);
  const int64_t *meta = static_cast<const int64_t *>(params[META]);
  w->K = meta[0];
  w->bs = meta[1];
  w->nested_bs = meta[2];
  w->nested_shift = -1;
  for (int sh = 0; sh < 63; ++sh)
    if (w->nested_bs == (int64_t(1) << sh)) w->nested_shift = sh;
  *flags = meta[3];
  w->N = N;
  if (w->K < 0 || w->bs < 1) return fail(4, "invalid K=%lld or blocksize=%lld", (long long)w->K, (long long)w->bs);
  const int64_t total = w->N * w->K, nblocks = (total + w->bs - 1) / w->bs;
  if (!is(dtypes[P], "uint8") || numel(ndims[P], shapes[P]) < (total + 1) / 2)
    return fail(5, "packed weight must be uint8 with %lld bytes, got %s with %lld", (long long)((total + 1) / 2),
                dtypes[P], (long long)numel(ndims[P], shapes[P]));
  if (!is(dtypes[C], "float32") || numel(ndims[C], shapes[C]) != 16) return fail(6, "quant_map must be float32 [16]");
  if (numel(ndims[A], shapes[A]) != nblocks)
    return fail(7, "absmax has %lld entries, %lld blocks of %lld need %lld", (long long)numel(ndims[A], shapes[A]),
                (long long)total, (long long)w->bs, (long long)nblocks);
  w->packed = static_cast<const uint8_t *>(params[P]);
  w->code = static_cast<const float *>(params[C]);
  w->absmax = nullptr;
  w->qabsmax = nullptr;
  w->nested_absmax = nullptr;
  w->nested_code = nullptr;
  w->nested_offset = 0.f;
  w->block_offset = nullptr;
  if (*flags & 1) {  // double-quantized absmax
    if (!is(dtypes[A], "uint8")) return fail(8, "double-quantized absmax must be uint8, got %s", dtypes[A]);
    if (w->nested_bs < 1) return fail(9, "invalid nested blocksize %lld", (long long)w->nested_bs);
    const int64_t nn = (nblocks + w->nested_bs - 1) / w->nested_bs;
    if (!is(dtypes[NA], "float32") || numel(ndims[NA], shapes[NA]) != nn)
      return fail(10, "nested_absmax must be float32 [%lld]", (long long)nn);
    if (!is(dtypes[NC], "float32") || numel(ndims[NC], shapes[NC]) != 256)
      return fail(11, "nested_quant_map must be float32 [256]");
    if (!is(dtypes[NO], "float32") || numel(ndims[NO], shapes[NO]) < 1)
      return fail(12, "nested_offset must be float32 [1]");
    w->qabsmax = static_cast<const uint8_t *>(params[A]);
    w->nested_absmax = static_cast<const float *>(params[NA]);
    w->nested_code = static_cast<const float *>(params[NC]);
    w->nested_offset = *static_cast<const float *>(params[NO]);
  } else {
    if (!is(dtypes[A], "float32")) return fail(8, "absmax must be float32, got %s", dtypes[A]);
    w->absmax = static_cast<const float *>(params[A]);
  }
  if (*flags & 2) {  // asymmetric int4
    if (!is(dtypes[BO], "float32") || numel(ndims[BO], shapes[BO]) != nblocks)
      return fail(13, "block_offset must be float32 [%lld]", (long long)nblocks);
    w->block_offset = static_cast<const float *>(params[BO]);
  }
  return 0;
}

std::atomic<int> g_bf16_native{1};  // use vdpbf16ps when the CPU has it (0: always the emulation)
std::atomic<int> g_amx{1};  // use AMX tiles for batches when the CPU has them (bf16: while native bf16 is on)

int64_t rows_of(int nd, const int64_t *shape, int64_t last) {
  if (nd < 1) return -1;
  if (shape[nd - 1] != last) return -1;
  return numel(nd - 1, shape);
}

std::vector<int64_t> replace_last(int nd, const int64_t *shape, int64_t last) {
  if (nd >= 1 && shape[0] == -2) return std::vector<int64_t>{-2};  // dynamic rank
  std::vector<int64_t> out(shape, shape + (nd > 0 ? nd - 1 : 0));
  out.push_back(last);
  return out;
}

}  // namespace

bool bf16_native_enabled() {
  static const bool has = cpu_has_avx512bf16();
  return has && g_bf16_native.load(std::memory_order_relaxed) != 0;
}

bool amx_bf16_enabled() {
  static const bool has = amx_bf16_usable();
  return has && bf16_native_enabled() && g_amx.load(std::memory_order_relaxed) != 0;
}

bool amx_int8_enabled() {
  static const bool has = amx_int8_usable();
  return has && g_amx.load(std::memory_order_relaxed) != 0;
}
}  // namespace msbnb

using namespace msbnb;

// ==== aot kernels ===============================================================================================
// y[..., N] = x[..., K] @ dequant(W4)^T + bias
// inputs: x, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, block_offset, bias[N], meta
MSBNB_EXPORT int MsbnbLinear4bit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                 void *) {
  if (nparam != 11) return fail(1, "MsbnbLinear4bit takes 10 inputs and 1 output, got %d", nparam);
  const int X = 0, BIAS = 8, Y = 10;
  if (!is_float_act(dtypes[X]) || !is(dtypes[Y], dtypes[X]))
    return fail(2, "x must be float32 or float16 (and y alike), got %s -> %s", dtypes[X], dtypes[Y]);
  if (!is(dtypes[BIAS], "float32") || ndims[BIAS] != 1) return fail(2, "bias must be float32 [N]");
  const int64_t N = shapes[BIAS][0];
  W4 w;
  int64_t flags;
  if (int rc = parse_w4(params, ndims, shapes, dtypes, 1, 9, N, &w, &flags)) return rc;
  const int64_t M = rows_of(ndims[X], shapes[X], w.K);
  if (M < 0) return fail(14, "x's last dimension does not equal in_features=%lld", (long long)w.K);
  if (numel(ndims[Y], shapes[Y]) != M * N) return fail(15, "y must hold %lld x %lld values", (long long)M, (long long)N);
  const float *x = input_f32(params[X], dtypes[X], M * w.K, 4);
  float *y = output_f32(params[Y], dtypes[Y], M * N, 5);
  const float *bias = (flags & 4) ? static_cast<const float *>(params[BIAS]) : nullptr;
  if (flags & 8) {
    table().linear4bit_bf16(x, M, w, bias, y);
  } else if (flags & 16) {
    if (!w.aligned() || w.block_offset)
      return fail(16, "int8 compute needs in_features (%lld) to be a multiple of the blocksize (%lld) and a "
                      "symmetric code", (long long)w.K, (long long)w.bs);
    table().linear4bit_i8(x, M, w, bias, y);
  } else {
    table().linear4bit(x, M, w, bias, y);
  }
  finish_output(params[Y], dtypes[Y], y, M * N);
  return 0;
}
MSBNB_EXPORT std::vector<int64_t> MsbnbLinear4bitInferShape(int *ndims, int64_t **shapes, void *) {
  return replace_last(ndims[0], shapes[0], shapes[8][0]);
}

// Several 4-bit projections of the same input in one call (fused q/k/v, gate/up): y[..., sum N_i] is the
// concatenation of each projection's output, every one computed exactly as MsbnbLinear4bit computes it (its
// compute mode, float32, bfloat16 or int8, included).
// inputs: x, then per projection: packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
// block_offset, bias [N_i], meta (1 + 9 g inputs), output y
MSBNB_EXPORT int MsbnbLinear4bitMulti(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *, void *) {
  const int g = (nparam - 2) / 9;
  if (g < 1 || g > 8 || nparam != 2 + 9 * g)
    return fail(1, "MsbnbLinear4bitMulti takes x, 9 tensors per projection (1 to 8) and 1 output, got %d", nparam);
  const int X = 0, Y = nparam - 1;
  if (!is(dtypes[X], "float32") || !is(dtypes[Y], "float32")) return fail(2, "x and y must be float32");
  W4 ws[8];
  int64_t flags[8], starts[9], total = 0;
  for (int i = 0; i < g; ++i) {
    const int first = 1 + 9 * i, BIAS = first + 7, META = first + 8;
    if (!is(dtypes[BIAS], "float32") || ndims[BIAS] != 1) return fail(2, "bias %d must be float32 [N]", i);
    if (int rc = parse_w4(params, ndims, shapes, dtypes, first, META, shapes[BIAS][0], &ws[i], &flags[i])) return rc;
    if ((flags[i] & 16) && (!ws[i].aligned() || ws[i].block_offset))
      return fail(16, "projection %d: int8 compute needs in_features (%lld) to be a multiple of the blocksize (%lld) "
                      "and a symmetric code", i, (long long)ws[i].K, (long long)ws[i].bs);
    if (ws[i].K != ws[0].K) return fail(14, "projection %d has in_features %lld, not %lld", i, (long long)ws[i].K,
                                        (long long)ws[0].K);
    starts[i] = total;
    total += ws[i].N;
  }
  starts[g] = total;
  const int64_t M = rows_of(ndims[X], shapes[X], ws[0].K);
  if (M < 0) return fail(14, "x's last dimension does not equal in_features=%lld", (long long)ws[0].K);
  if (numel(ndims[Y], shapes[Y]) != M * total) return fail(15, "y must hold %lld x %lld values", (long long)M,
                                                         (long long)total);
  const float *x = static_cast<const float *>(params[X]);
  float *y = static_cast<float *>(params[Y]);
  for (int i = 0; i < g; ++i) {
    const float *bias = (flags[i] & 4) ? static_cast<const float *>(params[1 + 9 * i + 7]) : nullptr;
    const int64_t n = ws[i].N;
    // each projection in its own compute mode, as MsbnbLinear4bit computes it
    const auto linear = (flags[i] & 8) ? table().linear4bit_bf16 : (flags[i] & 16) ? table().linear4bit_i8 : table().linear4bit;
    if (M == 1) {  // one row: the projection's output is a contiguous slice of y
      linear(x, 1, ws[i], bias, y + starts[i]);
      continue;
    }
    float *tmp = static_cast<float *>(scratch(5, sizeof(float) * (size_t)(M * n > 0 ? M * n : 1)));
    linear(x, M, ws[i], bias, tmp);
    for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * total + starts[i], tmp + m * n, sizeof(float) * n);
  }
  return 0;
}

// dx[..., K] = dy[..., N] @ dequant(W4)
// inputs: dy, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, block_offset, meta, x
MSBNB_EXPORT int MsbnbLinear4bitDx(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                   void *) {
  if (nparam != 11) return fail(1, "MsbnbLinear4bitDx takes 10 inputs and 1 output, got %d", nparam);
  const int DY = 0, XL = 9, DX = 10;
  if (!is_float_act(dtypes[DY]) || !is(dtypes[DX], dtypes[XL]) || !is_float_act(dtypes[DX]))
    return fail(2, "dy and dx must be float32 or float16");
  if (ndims[DY] < 1) return fail(2, "dy must have at least one dimension");
  const int64_t N = shapes[DY][ndims[DY] - 1];
  W4 w;
  int64_t flags;
  if (int rc = parse_w4(params, ndims, shapes, dtypes, 1, 8, N, &w, &flags)) return rc;
  const int64_t M = numel(ndims[DY] - 1, shapes[DY]);
  if (numel(ndims[DX], shapes[DX]) != M * w.K) return fail(15, "dx must hold %lld x %lld values", (long long)M, (long long)w.K);
  const float *dy = input_f32(params[DY], dtypes[DY], M * N, 4);
  float *dx = output_f32(params[DX], dtypes[DX], M * w.K, 5);
  if (flags & 8)
    table().linear4bit_dx_bf16(dy, M, w, dx);
  else
    table().linear4bit_dx(dy, M, w, dx);
  finish_output(params[DX], dtypes[DX], dx, M * w.K);
  return 0;
}
MSBNB_EXPORT std::vector<int64_t> MsbnbLinear4bitDxInferShape(int *ndims, int64_t **shapes, void *) {
  return std::vector<int64_t>(shapes[9], shapes[9] + ndims[9]);
}

namespace msbnb {
namespace {
// inputs: q int8 [N, K], scale [N] or [1], offset (like scale; read only when flags & 1), ..., meta
int parse_w8(void **params, int *ndims, int64_t **shapes, const char **dtypes, int first, int64_t flags, W8 *w) {
  const int Q = first, S = first + 1, O = first + 2;
  if (!is(dtypes[Q], "int8") || ndims[Q] != 2) return fail(3, "weight must be int8 [N, K], got %s", dtypes[Q]);
  w->q = static_cast<const int8_t *>(params[Q]);
  w->N = shapes[Q][0];
  w->K = shapes[Q][1];
  const int64_t ns = numel(ndims[S], shapes[S]);
  if (!is(dtypes[S], "float32") || (ns != 1 && ns != w->N))
    return fail(4, "scale must be float32 [1] or [%lld]", (long long)w->N);
  w->scale = static_cast<const float *>(params[S]);
  w->scale_per_row = ns == w->N && w->N != 1;
  w->offset = nullptr;
  if (flags & 1) {
    if (!is(dtypes[O], "float32") || numel(ndims[O], shapes[O]) != ns) return fail(5, "offset must match scale");
    w->offset = static_cast<const float *>(params[O]);
  }
  return 0;
}
}  // namespace
}  // namespace msbnb

// y = x @ ((q - offset) * scale)^T + bias.  inputs: x, q, scale, offset, bias[N], meta int64 [2] (flags, 0)
MSBNB_EXPORT int MsbnbLinear8bit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                 void *) {
  if (nparam != 7) return fail(1, "MsbnbLinear8bit takes 6 inputs and 1 output, got %d", nparam);
  const int X = 0, BIAS = 4, META = 5, Y = 6;
  if (!is_float_act(dtypes[X]) || !is(dtypes[Y], dtypes[X])) return fail(2, "x must be float32 or float16");
  if (!is(dtypes[META], "int64") || numel(ndims[META], shapes[META]) < 1) return fail(2, "meta must be int64");
  const int64_t flags = static_cast<const int64_t *>(params[META])[0];
  W8 w;
  if (int rc = parse_w8(params, ndims, shapes, dtypes, 1, flags, &w)) return rc;
  if (!is(dtypes[BIAS], "float32") || numel(ndims[BIAS], shapes[BIAS]) != w.N) return fail(6, "bias must be float32 [N]");
  const int64_t M = rows_of(ndims[X], shapes[X], w.K);
  if (M < 0) return fail(14, "x's last dimension does not equal in_features=%lld", (long long)w.K);
  if (numel(ndims[Y], shapes[Y]) != M * w.N) return fail(15, "y has the wrong size");
  const float *x = input_f32(params[X], dtypes[X], M * w.K, 4);
  float *y = output_f32(params[Y], dtypes[Y], M * w.N, 5);
  const float *bias = (flags & 2) ? static_cast<const float *>(params[BIAS]) : nullptr;
  if (flags & 4) {
    table().linear8bit_bf16(x, M, w, bias, y);
  } else if (flags & 8) {
    if (w.offset) return fail(16, "int8 compute needs a symmetric int8 weight (no offset)");
    table().linear8bit_i8(x, M, w, bias, y);
  } else {
    table().linear8bit(x, M, w, bias, y);
  }
  finish_output(params[Y], dtypes[Y], y, M * w.N);
  return 0;
}
MSBNB_EXPORT std::vector<int64_t> MsbnbLinear8bitInferShape(int *ndims, int64_t **shapes, void *) {
  return replace_last(ndims[0], shapes[0], shapes[1][0]);
}

// dx = dy @ ((q - offset) * scale).  inputs: dy, q, scale, offset, meta, x
MSBNB_EXPORT int MsbnbLinear8bitDx(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                   void *) {
  if (nparam != 7) return fail(1, "MsbnbLinear8bitDx takes 6 inputs and 1 output, got %d", nparam);
  const int DY = 0, META = 4, XL = 5, DX = 6;
  if (!is_float_act(dtypes[DY]) || !is(dtypes[DX], dtypes[XL]) || !is_float_act(dtypes[DX]))
    return fail(2, "dy and dx must be float32 or float16");
  if (!is(dtypes[META], "int64") || numel(ndims[META], shapes[META]) < 1) return fail(2, "meta must be int64");
  const int64_t flags = static_cast<const int64_t *>(params[META])[0];
  W8 w;
  if (int rc = parse_w8(params, ndims, shapes, dtypes, 1, flags, &w)) return rc;
  const int64_t M = rows_of(ndims[DY], shapes[DY], w.N);
  if (M < 0) return fail(14, "dy's last dimension does not equal out_features=%lld", (long long)w.N);
  if (numel(ndims[DX], shapes[DX]) != M * w.K) return fail(15, "dx has the wrong size");
  const float *dy = input_f32(params[DY], dtypes[DY], M * w.N, 4);
  float *dx = output_f32(params[DX], dtypes[DX], M * w.K, 5);
  if (flags & 4)
    table().linear8bit_dx_bf16(dy, M, w, dx);
  else
    table().linear8bit_dx(dy, M, w, dx);
  finish_output(params[DX], dtypes[DX], dx, M * w.K);
  return 0;
}
MSBNB_EXPORT std::vector<int64_t> MsbnbLinear8bitDxInferShape(int *ndims, int64_t **shapes, void *) {
  return std::vector<int64_t>(shapes[5], shapes[5] + ndims[5]);
}

// LLM.int8().  inputs: x, CB int8 [N, K], SCB [N], bias [N], meta float32 [2] (threshold, has_bias)
MSBNB_EXPORT int MsbnbLlmInt8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  if (nparam != 6) return fail(1, "MsbnbLlmInt8 takes 5 inputs and 1 output, got %d", nparam);
  const int X = 0, CB = 1, SCB = 2, BIAS = 3, META = 4, Y = 5;
  if (!is_float_act(dtypes[X]) || !is(dtypes[Y], dtypes[X])) return fail(2, "x must be float32 or float16");
  if (!is(dtypes[CB], "int8") || ndims[CB] != 2) return fail(3, "CB must be int8 [N, K]");
  W8Lt w;
  w.N = shapes[CB][0];
  w.K = shapes[CB][1];
  if (!is(dtypes[SCB], "float32") || numel(ndims[SCB], shapes[SCB]) != w.N) return fail(4, "SCB must be float32 [N]");
  if (!is(dtypes[BIAS], "float32") || numel(ndims[BIAS], shapes[BIAS]) != w.N) return fail(6, "bias must be float32 [N]");
  if (!is(dtypes[META], "float32") || numel(ndims[META], shapes[META]) < 2) return fail(7, "meta must be float32 [2]");
  const float *meta = static_cast<const float *>(params[META]);
  const int64_t M = rows_of(ndims[X], shapes[X], w.K);
  if (M < 0) return fail(14, "x's last dimension does not equal in_features=%lld", (long long)w.K);
  if (numel(ndims[Y], shapes[Y]) != M * w.N) return fail(15, "y has the wrong size");
  w.CB = static_cast<const int8_t *>(params[CB]);
  w.SCB = static_cast<const float *>(params[SCB]);
  const float *x = input_f32(params[X], dtypes[X], M * w.K, 4);
  float *y = output_f32(params[Y], dtypes[Y], M * w.N, 5);
  table().llm_int8(x, M, w, meta[0], meta[1] != 0.f ? static_cast<const float *>(params[BIAS]) : nullptr, y);
  finish_output(params[Y], dtypes[Y], y, M * w.N);
  return 0;
}
MSBNB_EXPORT std::vector<int64_t> MsbnbLlmInt8InferShape(int *ndims, int64_t **shapes, void *) {
  return replace_last(ndims[0], shapes[0], shapes[1][0]);
}

// ==== ctypes API ================================================================================================
MSBNB_EXPORT int msbnb_abi_version() { return 1; }
MSBNB_EXPORT const char *msbnb_last_error() { return g_error; }
MSBNB_EXPORT const char *msbnb_isa() { return table().name; }
MSBNB_EXPORT const char *msbnb_best_isa() { return best_table()->name; }
// Force an instruction set ("avx512", "avx2", "portable", or "auto"); returns 0, or 1 if this CPU lacks it.
MSBNB_EXPORT int msbnb_set_isa(const char *name) {
  const KernelTable *t = nullptr;
  if (is(name, "auto")) t = best_table();
  else if (is(name, "avx512") && cpu_has_avx512()) t = &kTableAvx512;
  else if (is(name, "avx2") && cpu_has_avx2()) t = &kTableAvx2;
  else if (is(name, "portable")) t = &kTablePortable;
  if (!t) return 1;
  g_table.store(t, std::memory_order_release);
  return 0;
}
MSBNB_EXPORT int msbnb_isa_supported(const char *name) {
  return is(name, "portable") || (is(name, "avx2") && cpu_has_avx2()) || (is(name, "avx512") && cpu_has_avx512());
}
// bf16 dot products: 1 = vdpbf16ps where the CPU has AVX512-BF16 (the default), 0 = always the emulation.
MSBNB_EXPORT void msbnb_set_bf16_native(int on) { g_bf16_native.store(on ? 1 : 0, std::memory_order_relaxed); }
MSBNB_EXPORT int msbnb_bf16_native() { return bf16_native_enabled() && table().name == kTableAvx512.name ? 1 : 0; }
MSBNB_EXPORT int msbnb_cpu_has_bf16() { return cpu_has_avx512bf16() ? 1 : 0; }
// Batches on AMX tiles: bf16 products from 8 rows of x, int8 products (the same bits) from 5; 1 = where the CPU
// has them (the default), 0 = never. msbnb_amx / msbnb_cpu_has_amx: bit 0 bf16, bit 1 int8.
MSBNB_EXPORT void msbnb_set_amx(int on) { g_amx.store(on ? 1 : 0, std::memory_order_relaxed); }
MSBNB_EXPORT int msbnb_amx() {
  if (table().name != kTableAvx512.name) return 0;
  return (amx_bf16_enabled() ? 1 : 0) | (amx_int8_enabled() ? 2 : 0);
}
MSBNB_EXPORT int msbnb_cpu_has_amx() {
  static const int has = (amx_bf16_usable() ? 1 : 0) | (amx_int8_usable() ? 2 : 0);
  return has;
}
MSBNB_EXPORT int msbnb_num_threads() { return num_threads(); }
MSBNB_EXPORT void msbnb_set_num_threads(int n) { set_num_threads(n); }

MSBNB_EXPORT int msbnb_quantize_4bit(const float *a, int64_t n, int64_t bs, const float *code, const uint8_t *order,
                                     int symmetric, uint8_t *packed, float *absmax, float *block_offset) {
  if (n < 0 || bs < 2 || bs % 2) return fail(1, "invalid n or blocksize");
  for (int i = 0; i < 16; ++i)
    if (order[i] > 15) return fail(2, "order must hold indices in [0, 15]");
  if (!symmetric && !block_offset) return fail(3, "asymmetric quantization needs block_offset");
  const int64_t bad = table().quantize_4bit(a, n, bs, code, order, symmetric, packed, absmax, block_offset);
  if (bad) return fail(4, "%lld non-finite input values", (long long)bad);
  return 0;
}
MSBNB_EXPORT int msbnb_quantize_blockwise_8bit(const float *a, int64_t n, int64_t bs, const float *code, uint8_t *out,
                                               float *absmax) {
  if (n < 0 || bs < 1) return fail(1, "invalid n or blocksize");
  table().quantize_blockwise_8bit(a, n, bs, code, out, absmax);
  return 0;
}
MSBNB_EXPORT int msbnb_int8_rowwise(const float *a, int64_t rows, int64_t cols, int8_t *cb, float *scb) {
  if (rows < 0 || cols < 0) return fail(1, "invalid shape");
  table().int8_rowwise(a, rows, cols, cb, scb);
  return 0;
}

// GPTQ's inner loop over one lazy batch of b input columns whose scales are already fixed (static groups;
// msbnb_pass.formats.gptq.gptq_quantize): the same float32 operations in the same order as the numpy loop
// (-ffp-contract=off), so both give identical codes. w: [b, n], the batch's columns (rows of W^T), updated
// in place; u: the batch's block of the inverse-Hessian factor (u[i * ldu + j] = U[col_i, col_j]);
// scale/inv/off: [b, n] per column and output row (off may be null: symmetric); the code book ``code``
// [ncodes], ``bounds`` [ncodes - 1] (midpoints of the sorted codes) and ``order`` (sorted index -> code);
// out: codes [b, n] and the scaled errors err [b, n] (the lazy update of the later columns).
MSBNB_EXPORT int msbnb_gptq_batch(float *w, int64_t b, int64_t n, const float *u, int64_t ldu, const float *scale,
                                  const float *inv, const float *off, const float *code, const float *bounds,
                                  const uint8_t *order, int32_t ncodes, uint8_t *codes, float *err) {
  if (b < 0 || n < 0 || ldu < b || ncodes < 2 || ncodes > 256) return fail(1, "invalid gptq batch shape");
  const int32_t nb = ncodes - 1;
  for (int64_t i = 0; i < b; ++i) {
    float *wi = w + i * n;
    float *ei = err + i * n;
    const float d = u[i * ldu + i];
    const float *si = scale + i * n, *vi = inv + i * n, *oi = off ? off + i * n : nullptr;
    uint8_t *ci = codes + i * n;
    for (int64_t r = 0; r < n; ++r) {
      float x = oi ? (wi[r] - oi[r]) * vi[r] : wi[r] * vi[r];
      x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
      int32_t k = 0;  // numpy.searchsorted(bounds, x, side="left"): how many bounds are below x
      while (k < nb && bounds[k] < x) ++k;
      const uint8_t c = order[k];
      ci[r] = c;
      float q = code[c] * si[r];
      if (oi) q = q + oi[r];
      const float e = (wi[r] - q) / d;
      ei[r] = e;
    }
    for (int64_t j = i + 1; j < b; ++j) {
      const float uij = u[i * ldu + j];
      float *wj = w + j * n;
      for (int64_t r = 0; r < n; ++r) wj[r] = wj[r] - uij * ei[r];
    }
  }
  return 0;
}
