// Standalone self-test of the kernel library for AddressSanitizer / UBSan / valgrind runs (no MindSpore).
//
// Build and run (see tools/check_kernels_asan.sh):
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -pthread \
//       -I msbnb_pass/kernels/csrc tools/kernel_selftest.cc msbnb_pass/kernels/csrc/*.cc -o /tmp/kernel_selftest
//   /tmp/kernel_selftest
//
// It calls every aot entry point the way MindSpore does (params / ndims / shapes / dtypes arrays) on
// random shapes, with every buffer allocated at its exact size so an out-of-bounds read or write is
// caught, on every instruction set the CPU has, and compares with a scalar decode-then-matmul.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

extern "C" {
int MsbnbLinear4bit(int, void **, int *, int64_t **, const char **, void *, void *);
int MsbnbLinear4bitDx(int, void **, int *, int64_t **, const char **, void *, void *);
int MsbnbLinear8bit(int, void **, int *, int64_t **, const char **, void *, void *);
int MsbnbLinear8bitDx(int, void **, int *, int64_t **, const char **, void *, void *);
int MsbnbLlmInt8(int, void **, int *, int64_t **, const char **, void *, void *);
int MsbnbDecodeLayer4bit(int, void **, int *, int64_t **, const char **, void *, void *);
int msbnb_set_isa(const char *);
int msbnb_isa_supported(const char *);
void msbnb_set_num_threads(int);
const char *msbnb_last_error();
int msbnb_quantize_4bit(const float *, int64_t, int64_t, const float *, const uint8_t *, int, uint8_t *, float *,
                        float *);
int msbnb_quantize_blockwise_8bit(const float *, int64_t, int64_t, const float *, uint8_t *, float *);
}

namespace {

std::mt19937 rng(1234);

struct Arg {  // one input or output tensor, heap-allocated at exactly its size
  std::vector<int64_t> shape;
  std::string dtype;
  std::vector<unsigned char> data;
  Arg(std::vector<int64_t> s, const char *dt) : shape(std::move(s)), dtype(dt) {
    size_t n = 1;
    for (auto d : shape) n *= (size_t)d;
    size_t item = dtype == "float32" || dtype == "int32" ? 4 : dtype == "int64" ? 8 : dtype == "float16" ? 2 : 1;
    data.resize(n * item);
  }
  template <class T>
  T *as() { return reinterpret_cast<T *>(data.data()); }
  size_t count() const {
    size_t n = 1;
    for (auto d : shape) n *= (size_t)d;
    return n;
  }
};

int call(int (*fn)(int, void **, int *, int64_t **, const char **, void *, void *), std::vector<Arg *> args) {
  std::vector<void *> params;
  std::vector<int> ndims;
  std::vector<int64_t *> shapes;
  std::vector<const char *> dtypes;
  for (auto *a : args) {
    params.push_back(a->data.empty() ? nullptr : a->data.data());
    ndims.push_back((int)a->shape.size());
    shapes.push_back(a->shape.data());
    dtypes.push_back(a->dtype.c_str());
  }
  return fn((int)args.size(), params.data(), ndims.data(), shapes.data(), dtypes.data(), nullptr, nullptr);
}

float randn() {
  static std::normal_distribution<float> d(0.f, 1.f);
  return d(rng);
}

int failures = 0;
void expect(bool ok, const char *what, double err) {
  if (!ok) {
    std::printf("FAIL %s (err %g) %s\n", what, err, msbnb_last_error());
    failures++;
  }
}

const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

void test_4bit(int64_t N, int64_t K, int64_t M, int64_t bs, bool nested, bool asym) {
  const int64_t n = N * K, nb = (n + bs - 1) / bs;
  std::vector<float> W((size_t)n);
  for (auto &v : W) v = randn();
  uint8_t order[16];
  for (int i = 0; i < 16; ++i) order[i] = (uint8_t)i;
  std::vector<float> code(kNF4, kNF4 + 16);
  if (asym)
    for (int i = 0; i < 16; ++i) code[i] = (2.f * i - 15.f) / 15.f;
  Arg x({M, K}, "float32"), packed({(n + 1) / 2, 1}, "uint8"), absmax({nb}, nested ? "uint8" : "float32"),
      cd({16}, "float32"), nabs({nested ? (nb + 255) / 256 : 1}, "float32"), ncode({nested ? 256 : 1}, "float32"),
      noff({1}, "float32"), boff({asym ? nb : 1}, "float32"), bias({N}, "float32"), meta({4}, "int64"),
      y({M, N}, "float32");
  std::vector<float> am((size_t)nb), bo((size_t)nb);
  msbnb_quantize_4bit(W.data(), n, bs, code.data(), order, asym ? 0 : 1, packed.as<uint8_t>(), am.data(),
                      asym ? bo.data() : nullptr);
  std::memcpy(cd.as<float>(), code.data(), 64);
  std::vector<float> scale = am;
  if (nested) {  // a simple 8-bit linear nested code around the mean
    float mean = 0.f, mx = 0.f;
    for (auto v : am) mean += v / (float)nb;
    for (int i = 0; i < 256; ++i) ncode.as<float>()[i] = (i - 127.5f) / 127.5f;
    for (auto v : am) mx = std::fmax(mx, std::fabs(v - mean));
    for (int64_t b = 0; b < (nb + 255) / 256; ++b) nabs.as<float>()[b] = mx;
    noff.as<float>()[0] = mean;
    for (int64_t b = 0; b < nb; ++b) {
      int c = (int)std::lround((am[b] - mean) / (mx > 0 ? mx : 1) * 127.5f + 127.5f);
      c = c < 0 ? 0 : (c > 255 ? 255 : c);
      absmax.as<uint8_t>()[b] = (uint8_t)c;
      scale[b] = ncode.as<float>()[c] * mx + mean;
    }
  } else {
    std::memcpy(absmax.as<float>(), am.data(), sizeof(float) * nb);
  }
  if (asym) std::memcpy(boff.as<float>(), bo.data(), sizeof(float) * nb);
  for (size_t i = 0; i < x.count(); ++i) x.as<float>()[i] = randn();
  for (int64_t i = 0; i < N; ++i) bias.as<float>()[i] = randn();
  int64_t *mt = meta.as<int64_t>();
  mt[0] = K, mt[1] = bs, mt[2] = 256, mt[3] = (nested ? 1 : 0) | (asym ? 2 : 0) | 4;
  int rc = call(MsbnbLinear4bit, {&x, &packed, &absmax, &cd, &nabs, &ncode, &noff, &boff, &bias, &meta, &y});
  expect(rc == 0, "linear4bit rc", rc);
  std::vector<double> Wd((size_t)n);
  for (int64_t f = 0; f < n; ++f) {
    const uint8_t byte = packed.as<uint8_t>()[f >> 1];
    const int idx = (f & 1) ? (byte & 15) : (byte >> 4);
    Wd[f] = (double)(code[idx] * scale[f / bs]) + (asym ? bo[f / bs] : 0.0);
  }
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < N; ++j) {
      double ref = bias.as<float>()[j], mag = std::fabs(ref);
      for (int64_t k = 0; k < K; ++k) {
        ref += (double)x.as<float>()[m * K + k] * Wd[j * K + k];
        mag += std::fabs((double)x.as<float>()[m * K + k] * Wd[j * K + k]);
      }
      worst = std::fmax(worst, std::fabs(y.as<float>()[m * N + j] - ref) / (mag * (K + 3) * 6e-8 + 1e-30));
    }
  expect(worst <= 1.0, "linear4bit vs reference", worst);
  // bfloat16 and int8 compute (loose checks: these runs are for out-of-bounds accesses; the Python tests
  // hold them to their bounds)
  const bool int8_ok = !asym && K % bs == 0;
  for (int64_t mode : {int64_t(8), int64_t(16)}) {
    if (mode == 16 && !int8_ok) continue;
    Arg y3({M, N}, "float32"), meta3({4}, "int64");
    std::memcpy(meta3.as<int64_t>(), mt, 32);
    meta3.as<int64_t>()[3] |= mode;
    rc = call(MsbnbLinear4bit, {&x, &packed, &absmax, &cd, &nabs, &ncode, &noff, &boff, &bias, &meta3, &y3});
    expect(rc == 0, mode == 8 ? "linear4bit bf16 rc" : "linear4bit int8 rc", rc);
    double w3 = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < N; ++j) {
        double ref = bias.as<float>()[j], mag = std::fabs(ref);
        for (int64_t k = 0; k < K; ++k) {
          ref += (double)x.as<float>()[m * K + k] * Wd[j * K + k];
          mag += std::fabs((double)x.as<float>()[m * K + k] * Wd[j * K + k]);
        }
        w3 = std::fmax(w3, std::fabs(y3.as<float>()[m * N + j] - ref) / (mag + 1e-30));
      }
    expect(w3 < (mode == 8 ? 0.01 : 0.05), mode == 8 ? "linear4bit bf16 vs reference" : "linear4bit int8 vs reference",
           w3);
  }
  // dx
  Arg dy({M, N}, "float32"), meta2({4}, "int64"), dx({M, K}, "float32");
  std::memcpy(meta2.as<int64_t>(), mt, 32);
  for (size_t i = 0; i < dy.count(); ++i) dy.as<float>()[i] = randn();
  rc = call(MsbnbLinear4bitDx, {&dy, &packed, &absmax, &cd, &nabs, &ncode, &noff, &boff, &meta2, &x, &dx});
  expect(rc == 0, "linear4bit_dx rc", rc);
  worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      double ref = 0, mag = 0;
      for (int64_t j = 0; j < N; ++j) {
        ref += (double)dy.as<float>()[m * N + j] * Wd[j * K + k];
        mag += std::fabs((double)dy.as<float>()[m * N + j] * Wd[j * K + k]);
      }
      worst = std::fmax(worst, std::fabs(dx.as<float>()[m * K + k] - ref) / (mag * (N + 3) * 6e-8 + 1e-30));
    }
  expect(worst <= 1.0, "linear4bit_dx vs reference", worst);
  // the bfloat16 mode's dx (loose check, as for its forward)
  Arg dxb({M, K}, "float32");
  meta2.as<int64_t>()[3] |= 8;
  rc = call(MsbnbLinear4bitDx, {&dy, &packed, &absmax, &cd, &nabs, &ncode, &noff, &boff, &meta2, &x, &dxb});
  expect(rc == 0, "linear4bit_dx bf16 rc", rc);
  double wb = 0;
  for (int64_t i = 0; i < M * K; ++i) wb = std::fmax(wb, std::fabs(dxb.as<float>()[i] - dx.as<float>()[i]));
  double scale_dx = 0;
  for (int64_t i = 0; i < M * K; ++i) scale_dx = std::fmax(scale_dx, std::fabs(dx.as<float>()[i]));
  expect(wb <= 0.05 * scale_dx + 1e-30, "linear4bit_dx bf16 vs float dx", wb);
}

void test_8bit(int64_t N, int64_t K, int64_t M, bool asym, float threshold) {
  Arg x({M, K}, "float32"), q({N, K}, "int8"), s({N}, "float32"), o({N}, "float32"), bias({N}, "float32"),
      meta({2}, "int64"), y({M, N}, "float32");
  for (size_t i = 0; i < x.count(); ++i) x.as<float>()[i] = randn() * (i % 7 == 0 ? 8.f : 1.f);
  for (size_t i = 0; i < q.count(); ++i) q.as<int8_t>()[i] = (int8_t)((int)(rng() % 255) - 127);
  for (int64_t j = 0; j < N; ++j) {
    s.as<float>()[j] = 0.01f + 0.001f * (float)j;
    o.as<float>()[j] = asym ? (float)((int)(rng() % 21) - 10) : 0.f;
    bias.as<float>()[j] = randn();
  }
  meta.as<int64_t>()[0] = (asym ? 1 : 0) | 2;
  int rc = call(MsbnbLinear8bit, {&x, &q, &s, &o, &bias, &meta, &y});
  expect(rc == 0, "linear8bit rc", rc);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < N; ++j) {
      double ref = bias.as<float>()[j], mag = std::fabs(ref);
      for (int64_t k = 0; k < K; ++k) {
        const double w = ((double)q.as<int8_t>()[j * K + k] - o.as<float>()[j]) * s.as<float>()[j];
        ref += (double)x.as<float>()[m * K + k] * w;
        mag += std::fabs((double)x.as<float>()[m * K + k] * w);
      }
      worst = std::fmax(worst, std::fabs(y.as<float>()[m * N + j] - ref) / (mag * (K + 3) * 6e-8 + 1e-30));
    }
  expect(worst <= 1.0, "linear8bit vs reference", worst);
  for (int64_t mode : {int64_t(4), int64_t(8)}) {  // bfloat16 and int8 compute (int8: symmetric only)
    if (mode == 8 && asym) continue;
    Arg y3({M, N}, "float32"), meta3({2}, "int64");
    meta3.as<int64_t>()[0] = meta.as<int64_t>()[0] | mode;
    rc = call(MsbnbLinear8bit, {&x, &q, &s, &o, &bias, &meta3, &y3});
    expect(rc == 0, "linear8bit bf16/int8 rc", rc);
    double w3 = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < N; ++j) {
        double ref = bias.as<float>()[j], mag = std::fabs(ref);
        for (int64_t k = 0; k < K; ++k) {
          const double w = ((double)q.as<int8_t>()[j * K + k] - o.as<float>()[j]) * s.as<float>()[j];
          ref += (double)x.as<float>()[m * K + k] * w;
          mag += std::fabs((double)x.as<float>()[m * K + k] * w);
        }
        w3 = std::fmax(w3, std::fabs(y3.as<float>()[m * N + j] - ref) / (mag + 1e-30));
      }
    expect(w3 < (mode == 4 ? 0.01 : 0.05), "linear8bit bf16/int8 vs reference", w3);
  }
  if (M > 1) {  // a NaN row through LLM.int8() and int8 compute: must not touch memory out of bounds
    Arg xn({M, K}, "float32"), yn({M, N}, "float32"), scbn({N}, "float32"), mfn({2}, "float32"), m8({2}, "int64");
    std::memcpy(xn.as<float>(), x.as<float>(), sizeof(float) * x.count());
    xn.as<float>()[K / 2] = std::nanf("");
    for (int64_t j = 0; j < N; ++j) scbn.as<float>()[j] = 1.27f;
    mfn.as<float>()[0] = threshold;
    mfn.as<float>()[1] = 1.f;
    expect(call(MsbnbLlmInt8, {&xn, &q, &scbn, &bias, &mfn, &yn}) == 0, "llm_int8 NaN rc", 0);
    expect(std::isnan(yn.as<float>()[0]) && !std::isnan(yn.as<float>()[N]), "llm_int8 NaN row", 0);
    if (!asym) {
      m8.as<int64_t>()[0] = 2 | 8;
      expect(call(MsbnbLinear8bit, {&xn, &q, &s, &o, &bias, &m8, &yn}) == 0, "int8 compute NaN rc", 0);
      expect(std::isnan(yn.as<float>()[0]) && !std::isnan(yn.as<float>()[N]), "int8 compute NaN row", 0);
    }
  }
  Arg dy({M, N}, "float32"), dx({M, K}, "float32");
  for (size_t i = 0; i < dy.count(); ++i) dy.as<float>()[i] = randn();
  rc = call(MsbnbLinear8bitDx, {&dy, &q, &s, &o, &meta, &x, &dx});
  expect(rc == 0, "linear8bit_dx rc", rc);
  Arg dxb({M, K}, "float32"), mb({2}, "int64");
  mb.as<int64_t>()[0] = meta.as<int64_t>()[0] | 4;
  rc = call(MsbnbLinear8bitDx, {&dy, &q, &s, &o, &mb, &x, &dxb});
  expect(rc == 0, "linear8bit_dx bf16 rc", rc);
  double wb = 0, scale_dx = 0;
  for (int64_t i = 0; i < M * K; ++i) {
    wb = std::fmax(wb, std::fabs(dxb.as<float>()[i] - dx.as<float>()[i]));
    scale_dx = std::fmax(scale_dx, std::fabs(dx.as<float>()[i]));
  }
  expect(wb <= 0.05 * scale_dx + 1e-30, "linear8bit_dx bf16 vs float dx", wb);
  // LLM.int8(): run it for out-of-bounds checking and a loose accuracy check
  Arg scb({N}, "float32"), metaf({2}, "float32"), y2({M, N}, "float32");
  for (int64_t j = 0; j < N; ++j) scb.as<float>()[j] = 1.27f;
  metaf.as<float>()[0] = threshold;
  metaf.as<float>()[1] = 1.f;
  rc = call(MsbnbLlmInt8, {&x, &q, &scb, &bias, &metaf, &y2});
  expect(rc == 0, "llm_int8 rc", rc);
  worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < N; ++j) {
      double ref = bias.as<float>()[j], mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        ref += (double)x.as<float>()[m * K + k] * q.as<int8_t>()[j * K + k] * 0.01;
        mag += std::fabs((double)x.as<float>()[m * K + k] * q.as<int8_t>()[j * K + k] * 0.01);
      }
      worst = std::fmax(worst, std::fabs(y2.as<float>()[m * N + j] - ref) / (mag + 1e-9));
    }
  expect(worst < 0.05, "llm_int8 vs float reference", worst);
}

// One 4-bit projection as MsbnbLinear4bitMulti / MsbnbDecodeLayer4bit take it (9 tensors, exact sizes).
struct Proj4 {
  Arg packed, absmax, code, nabs, ncode, noff, boff, bias, meta;
  Proj4(int64_t N, int64_t K, int64_t bs)
      : packed({(N * K + 1) / 2}, "uint8"), absmax({(N * K + bs - 1) / bs}, "float32"), code({16}, "float32"),
        nabs({1}, "float32"), ncode({1}, "float32"), noff({1}, "float32"), boff({1}, "float32"),
        bias({N}, "float32"), meta({4}, "int64") {
    std::vector<float> W((size_t)(N * K));
    for (auto &v : W) v = randn() * 0.05f;
    uint8_t order[16];
    for (int i = 0; i < 16; ++i) order[i] = (uint8_t)i;
    msbnb_quantize_4bit(W.data(), N * K, bs, kNF4, order, 1, packed.as<uint8_t>(), absmax.as<float>(), nullptr);
    std::memcpy(code.as<float>(), kNF4, 64);
    int64_t *mt = meta.as<int64_t>();
    mt[0] = K, mt[1] = bs, mt[2] = 256, mt[3] = 0;  // no bias, symmetric, float32 compute
  }
  void append(std::vector<Arg *> &args) {
    for (Arg *a : {&packed, &absmax, &code, &nabs, &ncode, &noff, &boff, &bias, &meta}) args.push_back(a);
  }
};

// A whole decoder layer (grouped-query heads, a cache of S slots, T new positions per sequence).
void test_decode_layer(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t D, int64_t I, int64_t S) {
  const int64_t H = NH * D;
  Arg x({B, T, H}, "float32"), a({B, T, H}, "float32"), cs({B, T, D}, "float32"), sn({B, T, D}, "float32"),
      meta({2}, "int64"), kc({B, NKV, S, D}, "float32"), vc({B, NKV, S, D}, "float32"), slots({B, NKV, T, 3}, "int32"),
      mask({B, T, S}, "float32"), scale({1}, "float32"), post({H}, "float32"), next({H}, "float32"), eps({1}, "float32"),
      xo({B, T, H}, "float32"), ao({B, T, H}, "float32");
  for (Arg *t : {&x, &a, &cs, &sn, &post, &next})
    for (size_t i = 0; i < t->count(); ++i) t->as<float>()[i] = randn();
  meta.as<int64_t>()[0] = NH, meta.as<int64_t>()[1] = NKV;
  const int64_t start = S - T;  // the new keys go to the last T slots; every slot is visible
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NKV; ++h)
      for (int64_t t = 0; t < T; ++t) {
        int32_t *r = slots.as<int32_t>() + ((b * NKV + h) * T + t) * 3;
        r[0] = (int32_t)b, r[1] = (int32_t)h, r[2] = (int32_t)(start + t);
      }
  scale.as<float>()[0] = 1.f / std::sqrt((float)D);
  eps.as<float>()[0] = 1e-5f;
  Proj4 q(NH * D, H, 64), k(NKV * D, H, 64), v(NKV * D, H, 64), o(H, NH * D, 64), g(I, H, 64), u(I, H, 64),
      dn(H, I, 64);
  std::vector<Arg *> args = {&x, &a, &cs, &sn, &meta, &kc, &vc, &slots, &mask, &scale, &post, &next, &eps};
  for (Proj4 *pr : {&q, &k, &v, &o, &g, &u, &dn}) pr->append(args);
  args.push_back(&xo);
  args.push_back(&ao);
  expect(call(MsbnbDecodeLayer4bit, args) == 0, "decode layer rc", 0);
  bool finite = true, written = false;
  for (size_t i = 0; i < xo.count(); ++i) finite = finite && std::isfinite(xo.as<float>()[i]) && std::isfinite(ao.as<float>()[i]);
  for (int64_t d = 0; d < D; ++d) written = written || kc.as<float>()[(S - 1) * D + d] != 0.f;
  expect(finite && written, "decode layer output finite, cache written", 0);
  slots.as<int32_t>()[2] = (int32_t)S;  // a slot outside the cache: refused, nothing written out of bounds
  expect(call(MsbnbDecodeLayer4bit, args) != 0, "decode layer bad slot rejected", 0);
  args.pop_back();
  expect(call(MsbnbDecodeLayer4bit, args) != 0, "decode layer wrong arity rejected", 0);
}

}  // namespace

int main() {
  const char *isas[] = {"avx512", "avx2", "portable"};
  for (const char *isa : isas) {
    if (!msbnb_isa_supported(isa)) continue;
    msbnb_set_isa(isa);
    for (int threads : {1, 2}) {
      msbnb_set_num_threads(threads);
      const int64_t shapes[][3] = {{16, 128, 1}, {33, 70, 3},  {8, 256, 5},   {5, 129, 17},
                                   {24, 64, 0}, {3, 33, 2},   {20, 128, 300}, {20, 1088, 1}, {7, 1030, 1},
                                   {13, 576, 3}, {9, 192, 2},  // rows in pairs (K % 128 == 64), rows left over
                                   {70, 650, 270}};  // the last: several dx panels and row blocks
      for (auto &s : shapes)
        for (int64_t bs : {32, 64, 256})
          for (int v = 0; v < 4; ++v) test_4bit(s[0], s[1], s[2], bs, v & 1, v & 2);
      for (auto &s : shapes)
        for (float thr : {0.f, 3.f}) {
          test_8bit(s[0], s[1], s[2], false, thr);
          test_8bit(s[0], s[1], s[2], true, thr);
        }
      test_decode_layer(1, 1, 4, 2, 16, 96, 8);   // a decode step
      test_decode_layer(2, 3, 6, 3, 32, 128, 5);  // a prefill of 3 positions, batch 2
    }
    std::printf("%s: done\n", isa);
  }
  // malformed calls must fail cleanly, not read out of bounds
  Arg x({2, 64}, "float32"), q({4, 64}, "int8"), s({3}, "float32"), o({1}, "float32"), b({4}, "float32"),
      meta({2}, "int64"), y({2, 4}, "float32");
  expect(call(MsbnbLinear8bit, {&x, &q, &s, &o, &b, &meta, &y}) != 0, "bad scale size rejected", 0);
  Arg x2({2, 63}, "float32"), s2({4}, "float32");
  expect(call(MsbnbLinear8bit, {&x2, &q, &s2, &o, &b, &meta, &y}) != 0, "bad K rejected", 0);
  std::printf("%s\n", failures ? "FAILED" : "all kernel self-tests passed");
  return failures ? 1 : 0;
}
