// msbnb_pass CPU kernels: shared declarations.
//
// The library is built once by `pip install` and runs on any x86-64: the kernels are compiled three
// times (AVX-512 with VNNI, AVX2 + FMA, portable C++) into separate translation units that each fill a
// KernelTable; api.cc picks one at load time from the CPU's features.
#pragma once

#include <cstddef>
#include <cstdint>

namespace msbnb {

// A 4-bit weight [N, K] in bitsandbytes' flat layout: row-major, blocks of `bs` elements over the
// flattened tensor (blocks may straddle rows when K % bs != 0), two codes per byte, first element in
// the high nibble. Value = code[idx] * scale(block) (+ block_offset[block] when asymmetric).
struct W4 {
  const uint8_t *packed;
  int64_t N, K, bs;
  const float *code;           // 16 entries
  const float *absmax;         // float32 per block, or nullptr when double-quantized
  const uint8_t *qabsmax;      // 8-bit codes per block (double quantization)
  const float *nested_absmax;  // per nested block
  const float *nested_code;    // 256 entries
  float nested_offset;
  int64_t nested_bs;
  int nested_shift;  // log2(nested_bs) when it is a power of two, else -1 (avoids a division per block)
  const float *block_offset;  // per block, asymmetric int4 only (else nullptr)

  __attribute__((always_inline)) inline float scale(int64_t b) const {
    if (absmax) return absmax[b];
    const int64_t nb = nested_shift >= 0 ? (b >> nested_shift) : b / nested_bs;
    float v = nested_code[qabsmax[b]] * nested_absmax[nb];
    return v + nested_offset;
  }
  __attribute__((always_inline)) inline bool aligned() const { return bs % 16 == 0 && K % bs == 0; }
};

// An int8 weight [N, K]: value = (q - offset[n]) * scale[n] (per row) or scale[0] (per tensor).
struct W8 {
  const int8_t *q;
  int64_t N, K;
  const float *scale;
  bool scale_per_row;
  const float *offset;  // nullptr when symmetric; per row or per tensor like scale
  __attribute__((always_inline)) inline float s(int64_t n) const { return scale_per_row ? scale[n] : scale[0]; }
  __attribute__((always_inline)) inline float o(int64_t n) const { return offset ? (scale_per_row ? offset[n] : offset[0]) : 0.0f; }
};

// LLM.int8(): CB [N, K] int8 (bitsandbytes' layout), SCB [N] row absmax.
struct W8Lt {
  const int8_t *CB;
  const float *SCB;
  int64_t N, K;
};

struct KernelTable {
  const char *name;
  // y[M, N] = x[M, K] @ W^T + bias (bias may be nullptr)
  void (*linear4bit)(const float *x, int64_t M, const W4 &w, const float *bias, float *y);
  // dx[M, K] = dy[M, N] @ W
  void (*linear4bit_dx)(const float *dy, int64_t M, const W4 &w, float *dx);
  void (*linear8bit)(const float *x, int64_t M, const W8 &w, const float *bias, float *y);
  void (*linear8bit_dx)(const float *dy, int64_t M, const W8 &w, float *dx);
  void (*llm_int8)(const float *x, int64_t M, const W8Lt &w, float threshold, const float *bias, float *y);
  // quantize n floats blockwise to 4 bits (bitsandbytes' rules); returns the count of NaN/Inf inputs
  int64_t (*quantize_4bit)(const float *a, int64_t n, int64_t bs, const float *code, const uint8_t *order,
                        int symmetric, uint8_t *packed, float *absmax, float *block_offset);
  // nearest entry of a sorted 256-entry code per value, blockwise absmax (8-bit dynamic quantization)
  void (*quantize_blockwise_8bit)(const float *a, int64_t n, int64_t bs, const float *code, uint8_t *out,
                                  float *absmax);
  // CB = round(A * 127 / absmax_row), SCB = absmax_row
  void (*int8_rowwise)(const float *a, int64_t rows, int64_t cols, int8_t *cb, float *scb);
  // bfloat16 compute: x and the decoded weights rounded to bf16 (round to nearest even, bf16 denormals
  // read as zero), products summed in float32 as AVX512-BF16's vdpbf16ps does (natively or emulated)
  void (*linear4bit_bf16)(const float *x, int64_t M, const W4 &w, const float *bias, float *y);
  void (*linear8bit_bf16)(const float *x, int64_t M, const W8 &w, const float *bias, float *y);
  // int8 compute: x quantized to int8 per row and block on the fly, weights as int8 levels, int32 sums
  // per block scaled in float32
  void (*linear4bit_i8)(const float *x, int64_t M, const W4 &w, const float *bias, float *y);
  void (*linear8bit_i8)(const float *x, int64_t M, const W8 &w, const float *bias, float *y);
  // the input gradient of the bfloat16 mode: dy and the decoded weights rounded to bf16, float32 sums in
  // vdpbf16ps' order over pairs of weight rows
  void (*linear4bit_dx_bf16)(const float *dy, int64_t M, const W4 &w, float *dx);
  void (*linear8bit_dx_bf16)(const float *dy, int64_t M, const W8 &w, float *dx);
};

extern const KernelTable kTableAvx512;
extern const KernelTable kTableAvx2;
extern const KernelTable kTablePortable;

// ---- bf16 dot products: native vdpbf16ps where the CPU has AVX512-BF16 and it is not disabled --------
bool bf16_native_enabled();
// AMX bf16 tiles usable (CPU, kernel permission) and enabled (msbnb_set_amx, native bf16 on).
bool amx_bf16_enabled();
// AMX int8 tiles usable and enabled (msbnb_set_amx).
bool amx_int8_enabled();

// ---- threads -----------------------------------------------------------------------------------------
int num_threads();
void set_num_threads(int n);
// While alive, the jobs this thread publishes let the workers spin `us` microseconds for the next one
// (instead of MSBNB_SPIN_US's default; an explicit MSBNB_SPIN_US wins). For kernels run back to back.
class SpinHint {
 public:
  explicit SpinHint(int us);
  ~SpinHint();
  SpinHint(const SpinHint &) = delete;
  SpinHint &operator=(const SpinHint &) = delete;

 private:
  int previous_;
};
// Whether no kernel worker is parked right now (each is working or spinning for the next job; a hint: it may
// change at once).
bool workers_awake();
// Run fn(task) for task in [0, ntasks) on up to num_threads() threads (the caller is one of them).
void parallel_for(int64_t ntasks, void (*fn)(void *ctx, int64_t task), void *ctx);

template <class F>
inline void parallel_tasks(int64_t ntasks, F &&f) {
  if (ntasks <= 0) return;
  if (ntasks == 1 || num_threads() == 1) {
    for (int64_t t = 0; t < ntasks; ++t) f(t);
    return;
  }
  parallel_for(
      ntasks, [](void *c, int64_t t) { (*static_cast<F *>(c))(t); }, &f);
}

// Thread-local scratch memory (64-byte aligned, grows as needed, reused between calls). Slots 0-3 belong
// to the kernels, 4-7 to the API layer around them.
void *scratch(int slot, size_t bytes);

}  // namespace msbnb
