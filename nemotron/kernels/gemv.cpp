// Matrix-vector kernels for decode on CPUs: y[r, n] = sum_seg scale[n, seg] * sum_{k in seg} W[n, k] x[r, k]
// for a few input rows r, each row optionally against its own expert's weight (W: [E, N, K]). The
// weight is read in its stored format and decoded in registers; accumulation is fp32.
//
// - fp32 / bf16 / E4M3 weights against fp32 inputs (AVX-512 or AVX2): every bf16 and E4M3 value is an
//   fp32 value, so the products are those with the dequantized weight;
// - bf16 and E4M3 weights against bf16 inputs through VDPBF16PS (AVX512-BF16): 32 products an
//   instruction; E4M3 subnormals (|q| < 2^-6) read as 0 there;
// - NVFP4 weights against int8 inputs (rounded per block of 16): integer products, exact sums, through
//   VPDPBUSD (AVX512-VNNI: 64 products an instruction) or VPMADDUBSW + VPMADDWD (AVX2).
//
// Threads: torch's (at::parallel_for over tiles of weight rows). Which instruction set runs is the
// caller's choice (`isa`), made from the CPU's features at run time; each is compiled with its own
// target attribute, so one build serves every x86-64 CPU with AVX2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define AVX2 __attribute__((target("avx2,f16c,fma")))

constexpr int MAXR = 8;  // input rows sharing one pass over a weight row
// how far ahead of the product each weight row is prefetched (a single core's memory requests in
// flight are what bound its bandwidth; measured: E4M3 rows read 1.4x faster from memory with it)
constexpr int64_t kAhead = 1024;

inline void ahead(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kAhead, _MM_HINT_T0); }

// ---- weight formats: each decodes the 32 weights at k..k+31 of one row to fp32 (w0: k..k+15, w1: k+16..k+31)

struct F32 {
  static constexpr float kScale = 1.0f;
  const float* w;
  void prefetch(int64_t k) const { ahead(w + k); ahead(w + k + 16); }
  AVX512 void load(int64_t k, __m512& w0, __m512& w1) const {
    w0 = _mm512_loadu_ps(w + k); w1 = _mm512_loadu_ps(w + k + 16);
  }
  AVX2 void load(int64_t k, __m256* o) const {
    for (int i = 0; i < 4; ++i) o[i] = _mm256_loadu_ps(w + k + 8 * i);
  }
};

struct BF16 {
  static constexpr float kScale = 1.0f;
  const uint16_t* w;
  void prefetch(int64_t k) const { ahead(w + k); }
  AVX512 static __m512 cvt16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  AVX512 void load(int64_t k, __m512& w0, __m512& w1) const { w0 = cvt16(w + k); w1 = cvt16(w + k + 16); }
  AVX2 void load(int64_t k, __m256* o) const {
    for (int i = 0; i < 4; ++i)
      o[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + k + 8 * i))), 16));
  }
};

// E4M3 -> the fp16 with the same bits shifted (sign 15, exponent 10..13, mantissa 7..9): the value
// times 2^-8, subnormals included (kScale restores the 2^8).
struct FP8 {
  static constexpr float kScale = 256.0f;
  const uint8_t* w;
  void prefetch(int64_t k) const { ahead(w + k); }
  AVX2 static float value(uint8_t b) {   // one, times 2^-8 (the bit trick of cvt16)
    return _cvtsh_ss(uint16_t(int16_t(uint16_t(b) << 8) >> 1) & 0xBFFF);
  }
  AVX512 static __m512 cvt16(const uint8_t* p) {
    __m256i h = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
    h = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(h, 8), 1), _mm256_set1_epi16(short(0xBFFF)));
    return _mm512_cvtph_ps(h);
  }
  AVX512 void load(int64_t k, __m512& w0, __m512& w1) const { w0 = cvt16(w + k); w1 = cvt16(w + k + 16); }
  AVX2 void load(int64_t k, __m256* o) const {
    for (int i = 0; i < 4; ++i) {
      __m128i h = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(w + k + 8 * i)));
      h = _mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(h, 8), 1), _mm_set1_epi16(short(0xBFFF)));
      o[i] = _mm256_cvtph_ps(h);
    }
  }
};

// one weight row against R input rows over [0, K): out[r * ldo] sums w * x_r per segment of `seg`
// weights (one scale each: s[seg]); the decoded weights are shared by the R rows. Two accumulator
// chains a row (weights k..k+15 and k+16..k+31): one chain's FMA latency would bound the row's rate.
template <int R, class W>
AVX512 void dot_avx512(const W& w, const float* const* x, int64_t K, int64_t seg, const float* s, float* out,
                       int64_t ldo) {
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += seg) {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + seg; k += 32) {
      __m512 w0, w1;
      w.prefetch(k);
      w.load(k, w0, w1);
      for (int r = 0; r < R; ++r) {
        acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r] + k), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r] + k + 16), acc1[r]);
      }
    }
    const __m512 f = _mm512_set1_ps(s ? s[k0 / seg] * W::kScale : W::kScale);
    for (int r = 0; r < R; ++r) total[r] = _mm512_fmadd_ps(_mm512_add_ps(acc0[r], acc1[r]), f, total[r]);
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_ps(total[r]);
}

AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// one weight row against R input rows over [k0, k1) (a multiple of 32 long)
template <int R, class W>
AVX2 void dot_avx2(const W& w, const float* const* x, int64_t k0, int64_t k1, float* out) {
  __m256 a[R][4];
  for (int r = 0; r < R; ++r) for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += 32) {
    __m256 wv[4];
    w.prefetch(k);
    w.load(k, wv);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(x[r] + k + 8 * i), a[r][i]);
  }
  for (int r = 0; r < R; ++r)
    out[r] = hsum256(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])));
}

// bf16 weights against bf16 inputs: VDPBF16PS, two products per fp32 lane; one weight row against R
// input rows (out[r * ldo]), two accumulator chains (32 weights each) a row
template <int R>
AVX512BF16 void dot_bf16dp(const uint16_t* w, const uint16_t* const* x, int64_t K, float* out, int64_t ldo) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    ahead(w + k); ahead(w + k + 32);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm512_dpbf16_ps(acc0[r], w0, (__m512bh)_mm512_loadu_si512(x[r] + k));
      acc1[r] = _mm512_dpbf16_ps(acc1[r], w1, (__m512bh)_mm512_loadu_si512(x[r] + k + 32));
    }
  }
  if (k < K) {   // K is a multiple of 32
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);
    for (int r = 0; r < R; ++r) acc0[r] = _mm512_dpbf16_ps(acc0[r], w0, (__m512bh)_mm512_loadu_si512(x[r] + k));
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

// E4M3 weights against bf16 inputs through VDPBF16PS. Each 64 stored bytes hold weights k..k+63 in
// the order of the byte unpacks (stored[16j + 8h + t] = w[k + 32h + 8j + t]); each unpacked word,
// b << 8, becomes the bf16 with the same value: exponent rebiased by 120 (7 -> 127), mantissa
// shifted; E4M3 subnormals (exponent 0, |w| < 2^-6) become 0.
AVX512BF16 inline __m512bh e4m3_to_bf16(__m512i u) {
  __m512i v = _mm512_and_si512(_mm512_srai_epi16(u, 4), _mm512_set1_epi16(short(0x87F0)));
  v = _mm512_add_epi16(v, _mm512_set1_epi16(0x3C00));
  return (__m512bh)_mm512_maskz_mov_epi16(_mm512_test_epi16_mask(u, _mm512_set1_epi16(0x7800)), v);
}

template <int R>
AVX512BF16 void dot_fp8dp(const uint8_t* w, const uint16_t* const* x, int64_t K, int64_t seg, const float* s, float* out,
                          int64_t ldo) {
  __m512 total[R];
  const __m512i zero = _mm512_setzero_si512();
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += seg) {
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + seg; k += 64) {
      ahead(w + k);
      const __m512i b = _mm512_loadu_si512(w + k);
      const __m512bh w0 = e4m3_to_bf16(_mm512_unpacklo_epi8(zero, b)), w1 = e4m3_to_bf16(_mm512_unpackhi_epi8(zero, b));
      for (int r = 0; r < R; ++r) {
        acc0[r] = _mm512_dpbf16_ps(acc0[r], w0, (__m512bh)_mm512_loadu_si512(x[r] + k));
        acc1[r] = _mm512_dpbf16_ps(acc1[r], w1, (__m512bh)_mm512_loadu_si512(x[r] + k + 32));
      }
    }
    const __m512 f = _mm512_set1_ps(s[k0 / seg]);
    for (int r = 0; r < R; ++r) total[r] = _mm512_fmadd_ps(_mm512_add_ps(acc0[r], acc1[r]), f, total[r]);
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_ps(total[r]);
}

// NVFP4 against int8 inputs through VPDPBUSD (AVX512-VNNI, W4A8), in chunks of 256 weights (16 blocks
// of 16) laid out block-transposed: int32 lane j sums block j, four weights an instruction, so a
// chunk's 16 block scales multiply once, as one vector. Per chunk 128 bytes, two loads of 64: byte
// 4j + u of load L = code(block j, 8L + u) | code(block j, 8L + 4 + u) << 4. The rows of each group
// of kGroup are interleaved chunk by chunk (kGroup x 128 code bytes, then kGroup x 16 scale bytes a
// chunk), so a tile's rows read two sequential streams. A code becomes the
// unsigned byte 2 * value + 12 (0..24: every E2M1 value times 2 is an integer); each input block of
// 16 is rounded to int8 with its own scale (amax / 127), and the offset 12 * sum(q) is taken off.
// The weights are exact; the inputs carry an int8 rounding per block (`quantize_blocks`).
constexpr int64_t kGroup = 4;                // rows interleaved (the Python side's ROW_GROUP)
constexpr int64_t kCodeStride = 128 * kGroup, kScaleStride = 16 * kGroup;   // bytes from one chunk to the next

struct QuantizedRows {
  at::Tensor q;      // [R, chunks, 4 steps, 16 blocks, 4] int8: step s of block j holds x[16j + 4s .. +3]
  at::Tensor scale;  // [R, chunks * 16] fp32: each block's amax / 127
  at::Tensor base;   // [R, chunks * 16] int32: -12 * the block's sum of q
  struct Row { const int32_t* q; const float* scale; const int32_t* base; };
  Row row(int64_t r, int64_t chunks) const {
    return {reinterpret_cast<const int32_t*>(q.data_ptr<int8_t>()) + r * chunks * 64,
            scale.data_ptr<float>() + r * chunks * 16, base.data_ptr<int32_t>() + r * chunks * 16};
  }
};

template <class T>
AVX512VNNI void quantize_blocks(const T* x, int64_t K, int64_t chunks, int8_t* q, float* scale, int32_t* base) {
  alignas(16) int32_t words[4];
  for (int64_t b = 0; b < chunks * 16; ++b) {
    const int64_t k = b * 16, n = std::max<int64_t>(0, std::min<int64_t>(16, K - k));
    const __mmask16 m = __mmask16((1u << n) - 1u);
    __m512 v;
    if constexpr (std::is_same_v<T, float>) v = _mm512_maskz_loadu_ps(m, x + k);
    else v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x + k)), 16));
    const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));  // nearest, ties to even
    scale[b] = amax / 127.0f;
    base[b] = -12 * _mm512_reduce_add_epi32(qi);
    _mm_store_si128((__m128i*)words, _mm512_cvtepi32_epi8(qi));
    const int64_t c = b / 16, j = b % 16;
    int32_t* out = reinterpret_cast<int32_t*>(q) + c * 64 + j;
    for (int s = 0; s < 4; ++s) out[16 * s] = words[s];
  }
}

inline float value_of(float v) { return v; }
inline float value_of(uint16_t bits) { uint32_t u = uint32_t(bits) << 16; float v; std::memcpy(&v, &u, 4); return v; }

// the same rounding in scalar code (the AVX2 path; equal results: the same fp32 operations, and
// nearbyint rounds ties to even as VCVTPS2DQ does)
template <class T>
void quantize_blocks_scalar(const T* x, int64_t K, int64_t chunks, int8_t* q, float* scale, int32_t* base) {
  for (int64_t b = 0; b < chunks * 16; ++b) {
    float v[16];
    float amax = 0.0f;
    for (int i = 0; i < 16; ++i) {
      v[i] = b * 16 + i < K ? value_of(x[b * 16 + i]) : 0.0f;
      amax = std::max(amax, std::fabs(v[i]));
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    const int64_t c = b / 16, j = b % 16;
    for (int i = 0; i < 16; ++i) {
      const int32_t qi = int32_t(std::nearbyint(v[i] * inv));
      sum += qi;
      q[c * 256 + (i / 4) * 64 + j * 4 + i % 4] = int8_t(qi);   // step i / 4 of block j
    }
    scale[b] = amax / 127.0f;
    base[b] = -12 * sum;
  }
}

template <int NT, int R>
AVX512VNNI void dot_nvfp4_i8(const uint8_t* const* w, const uint8_t* const* bs, const int64_t* rows,
                             const QuantizedRows& xq, int64_t chunks, float* out, int64_t ldo) {
  const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i low = _mm512_set1_epi8(0x0F);
  QuantizedRows::Row xr[R];
  for (int r = 0; r < R; ++r) xr[r] = xq.row(rows[r], chunks);
  __m512 total[NT][R];
  for (int t = 0; t < NT; ++t) for (int r = 0; r < R; ++r) total[t][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    ahead(bs[0] + c * kScaleStride);   // a tile's rows share a group: one scale line a chunk
    for (int t = 0; t < NT; ++t) {
      const uint8_t* p = w[t] + c * kCodeStride;
      ahead(p); ahead(p + 64);
      const __m512i b0 = _mm512_loadu_si512(p), b1 = _mm512_loadu_si512(p + 64);
      const __m512i v0 = _mm512_shuffle_epi8(table, _mm512_and_si512(b0, low));
      const __m512i v1 = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(b0, 4), low));
      const __m512i v2 = _mm512_shuffle_epi8(table, _mm512_and_si512(b1, low));
      const __m512i v3 = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(b1, 4), low));
      const __m512 ws = FP8::cvt16(bs[t] + c * kScaleStride);   // the 16 block scales, times 2^-8
      for (int r = 0; r < R; ++r) {
        const int32_t* x = xr[r].q + c * 64;
        // two chains of two (the instruction's latency, not its rate, bounds one chain of four)
        __m512i a0 = _mm512_dpbusd_epi32(_mm512_loadu_si512(xr[r].base + c * 16), v0, _mm512_loadu_si512(x));
        __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v1, _mm512_loadu_si512(x + 16));
        a0 = _mm512_dpbusd_epi32(a0, v2, _mm512_loadu_si512(x + 32));
        a1 = _mm512_dpbusd_epi32(a1, v3, _mm512_loadu_si512(x + 48));
        const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
        total[t][r] = _mm512_fmadd_ps(f, _mm512_mul_ps(ws, _mm512_loadu_ps(xr[r].scale + c * 16)), total[t][r]);
      }
    }
  }
  // 2^8 for the block scales' shift, 1/2 for the doubled codes
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) out[r * ldo + t] = _mm512_reduce_add_ps(total[t][r]) * (FP8::kScale / 2);
}

// dot_nvfp4_i8 on AVX2: VPMADDUBSW (pairs of products summed in 16 bits: at most 2 * 24 * 127, no
// saturation) and VPMADDWD (pairs of those summed in 32 bits: the four products VPDPBUSD sums), one
// weight row against R input rows; each 64-byte half of a chunk as two 32-byte halves (blocks 0-7, 8-15)
AVX2 inline __m256 e4m3x8(const uint8_t* p) {   // 8 E4M3 values, times 2^-8
  __m128i h = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)p));
  h = _mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(h, 8), 1), _mm_set1_epi16(short(0xBFFF)));
  return _mm256_cvtph_ps(h);
}

template <int R>
AVX2 void dot_nvfp4_i8_avx2(const uint8_t* w, const uint8_t* bs, const int64_t* rows, const QuantizedRows& xq,
                            int64_t chunks, float* out) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  QuantizedRows::Row xr[R];
  for (int r = 0; r < R; ++r) xr[r] = xq.row(rows[r], chunks);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* p = w + c * kCodeStride;
    ahead(p); ahead(p + 64); ahead(bs + c * kScaleStride);
    for (int h = 0; h < 2; ++h) {
      const __m256i b0 = _mm256_loadu_si256((const __m256i*)(p + 32 * h)), b1 = _mm256_loadu_si256((const __m256i*)(p + 64 + 32 * h));
      const __m256i v[4] = {_mm256_shuffle_epi8(table, _mm256_and_si256(b0, low)),
                            _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(b0, 4), low)),
                            _mm256_shuffle_epi8(table, _mm256_and_si256(b1, low)),
                            _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(b1, 4), low))};
      const __m256 ws = e4m3x8(bs + c * kScaleStride + 8 * h);
      for (int r = 0; r < R; ++r) {
        const int32_t* x = xr[r].q + c * 64 + 8 * h;   // step s of blocks 8h..8h+7 at x + 16 s
        __m256i acc = _mm256_loadu_si256((const __m256i*)(xr[r].base + c * 16 + 8 * h));
        for (int st = 0; st < 4; ++st)
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(v[st], _mm256_loadu_si256((const __m256i*)(x + 16 * st))), ones));
        total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(ws, _mm256_loadu_ps(xr[r].scale + c * 16 + 8 * h)), total[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum256(total[r]) * (FP8::kScale / 2);
}

// ---- the driver: groups of rows sharing an expert, tiles of weight rows split over threads

enum Isa : int64_t { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };
constexpr int NT = 4;  // NVFP4's weight rows per tile (2 when more than 4 input rows share it: registers)
// The float kernels' weight rows per tile, taken one after another (a thread's share of the weight
// still reads as one sequential stream): a tile per row cost more in the driver than the product of
// a short row (256 fp32 weights) took.
constexpr int kRun = 8;
constexpr int kNvfp4Run = 16;  // NVFP4's weight rows per tile: groups of NT (or 2) rows, one after another
constexpr int LDO = 16;        // the tiles' output stride: out[input row * LDO + tile row]

// calls CALL(tile rows, input rows) with both as constants: 1-4 x 1-4, and 1-2 x 5-8
#define BY_SHAPE(nt, nr, CALL)                                                                   \
  switch ((nt) * 16 + (nr)) {                                                                    \
    case 17: CALL(1, 1); break; case 18: CALL(1, 2); break; case 19: CALL(1, 3); break;          \
    case 20: CALL(1, 4); break; case 21: CALL(1, 5); break; case 22: CALL(1, 6); break;          \
    case 23: CALL(1, 7); break; case 24: CALL(1, 8); break;                                      \
    case 33: CALL(2, 1); break; case 34: CALL(2, 2); break; case 35: CALL(2, 3); break;          \
    case 36: CALL(2, 4); break; case 37: CALL(2, 5); break; case 38: CALL(2, 6); break;          \
    case 39: CALL(2, 7); break; case 40: CALL(2, 8); break;                                      \
    case 49: CALL(3, 1); break; case 50: CALL(3, 2); break; case 51: CALL(3, 3); break;          \
    case 52: CALL(3, 4); break;                                                                  \
    case 65: CALL(4, 1); break; case 66: CALL(4, 2); break; case 67: CALL(4, 3); break;          \
    case 68: CALL(4, 4); break;                                                                  \
    default: TORCH_CHECK(false, "no kernel for a tile of ", nt, " x ", nr);                      \
  }

struct Groups {
  std::vector<int64_t> expert;              // per group: which [N, K] slice of the weight
  std::vector<std::vector<int64_t>> rows;   // per group: the input rows it serves
};

Groups group_rows(const c10::optional<at::Tensor>& experts, int64_t R, int64_t E) {
  Groups g;
  if (!experts.has_value()) {
    TORCH_CHECK(E == 1, "a stack of experts needs an expert index per row");
    g.expert.push_back(0);
    g.rows.emplace_back();
    for (int64_t r = 0; r < R; ++r) g.rows[0].push_back(r);
    return g;
  }
  at::Tensor e = experts->to(at::kLong).contiguous();
  TORCH_CHECK(e.numel() == R, "one expert per input row expected");
  const int64_t* p = e.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(p[r] >= 0 && p[r] < E, "expert index ", p[r], " out of range for ", E, " experts");
    auto it = std::find(g.expert.begin(), g.expert.end(), p[r]);
    if (it == g.expert.end()) { g.expert.push_back(p[r]); g.rows.push_back({r}); }
    else g.rows[it - g.expert.begin()].push_back(r);
  }
  return g;
}

// tile(e, n0, nt, xs, nr, out[nr][NT]) computes weight rows n0..n0+nt-1 of expert e against nr inputs
// the result, [R, N] in the input's dtype (fp32, or bf16 rounded from the fp32 sums)
struct Output {
  at::Tensor y;
  float* f32;
  c10::BFloat16* bf16;
  Output(int64_t R, int64_t N, const at::Tensor& x)
      : y(at::empty({R, N}, x.options().dtype(x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat))),
        f32(y.scalar_type() == at::kFloat ? y.data_ptr<float>() : nullptr),
        bf16(f32 ? nullptr : y.data_ptr<c10::BFloat16>()) {}
  void store(int64_t at, const float* v, int n) const {
    if (f32) std::memcpy(f32 + at, v, n * sizeof(float));
    else for (int i = 0; i < n; ++i) bf16[at + i] = c10::BFloat16(v[i]);
  }
};

// tile(e, n0, nt, xs, nr, out[nr][LDO]) computes weight rows n0..n0+nt-1 of expert e against nr inputs;
// `tile_rows` weight rows a tile. The float kernels read a tile's rows one after another: a thread
// then reads its share of the weight as one sequential stream, where reading several short rows side
// by side (a 768-wide bf16 row is 1.5 KB) reads several streams restarted every few KB, at about half
// the rate from memory (BENCHMARKS.md).
template <class X, class Tile>
void drive(const Groups& g, int64_t N, const X* const* xrows, const Output& y, int64_t tile_rows, const Tile& tile) {
  const int64_t G = g.expert.size(), tiles = (N + tile_rows - 1) / tile_rows;
  at::parallel_for(0, G * tiles, 16 / tile_rows, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t gi = item / tiles, n0 = (item % tiles) * tile_rows, e = g.expert[gi];
      const int nt = int(std::min<int64_t>(tile_rows, N - n0));
      const auto& rows = g.rows[gi];
      for (size_t r0 = 0; r0 < rows.size(); r0 += MAXR) {
        const int nr = int(std::min<size_t>(MAXR, rows.size() - r0));
        const X* xs[MAXR];
        for (int i = 0; i < nr; ++i) xs[i] = xrows[rows[r0 + i]];
        float out[MAXR * LDO];  // [nr][LDO]
        tile(e, n0, nt, xs, nr, out);
        for (int i = 0; i < nr; ++i) y.store(rows[r0 + i] * N + n0, out + i * LDO, nt);
      }
    }
  });
}

// calls CALL(input rows) with the count as a constant, 1-8
#define BY_ROWS(nr, CALL)                                                                        \
  switch (nr) {                                                                                  \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; case 8: CALL(8); break; \
    default: TORCH_CHECK(false, "no kernel for ", nr, " rows");                                  \
  }

template <int R, class W>
void avx2_row(const W& w, const float* const* xs, int64_t K, int64_t seg, const float* s, float* out, int64_t ldo) {
  if constexpr (R > 4) {  // 16 registers: at most 4 rows a pass
    avx2_row<4>(w, xs, K, seg, s, out, ldo);
    avx2_row<R - 4>(w, xs + 4, K, seg, s, out + 4 * ldo, ldo);
  } else {
    float total[R] = {}, part[R];
    for (int64_t k0 = 0; k0 < K; k0 += seg) {
      dot_avx2<R>(w, xs, k0, k0 + seg, part);
      for (int r = 0; r < R; ++r) total[r] += part[r] * (s ? s[k0 / seg] * W::kScale : W::kScale);
    }
    for (int r = 0; r < R; ++r) out[r * ldo] = total[r];
  }
}

struct Prepared {
  at::Tensor x;  // [R, K] contiguous fp32 (or bf16 for the bf16 dot)
  std::vector<const void*> rows;
};

Prepared prepare(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a CPU tensor [rows, K]");
  Prepared p{x.to(dtype).contiguous(), {}};
  const int64_t K = p.x.size(1);
  const char* base = static_cast<const char*>(p.x.data_ptr());
  for (int64_t r = 0; r < p.x.size(0); ++r) p.rows.push_back(base + r * K * p.x.element_size());
  return p;
}


int64_t stack_size(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 || w.dim() == 3, "weight must be [N, K] or [E, N, K]");
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "weight must be a contiguous CPU tensor");
  return w.dim() == 3 ? w.size(0) : 1;
}

void check_scales(const at::Tensor& scales, const at::Tensor& w, int64_t nseg) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == stack_size(w) * w.size(-2) * nseg,
              "scales must be contiguous fp32, [E, N, segments]");
}

void check_k(int64_t K, int64_t nseg) {
  TORCH_CHECK(K % 32 == 0 && nseg > 0 && K % nseg == 0 && (K / nseg) % 32 == 0,
              "the input dimension and its scale segments must be multiples of 32");
}

// w: [E, N, K] or [N, K] of fp32 / bf16 / uint8 (E4M3 bits); scales: [E, N, nseg] fp32 or None
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scales,
                const c10::optional<at::Tensor>& experts, int64_t isa) {
  const int64_t K = w.size(-1), N = w.size(-2), R = x.size(0);
  const int64_t nseg = scales.has_value() ? scales->size(-1) : 1;
  check_k(K, nseg);
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
  if (scales.has_value()) check_scales(*scales, w, nseg);
  const Groups g = group_rows(experts, R, stack_size(w));
  const Output y(R, N, x);
  const float* s = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  const int64_t rowsize = N * K;
  if (w.scalar_type() == at::kBFloat16 && isa == kAvx512Bf16 && x.scalar_type() == at::kBFloat16 && !s) {
    Prepared p = prepare(x, at::kBFloat16);
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
    drive(g, N, reinterpret_cast<const uint16_t* const*>(p.rows.data()), y, kRun,
          [&](int64_t e, int64_t n0, int nt, const uint16_t* const* xs, int nr, float* out) {
#define CALL(B) for (int t = 0; t < nt; ++t) dot_bf16dp<B>(wp + e * rowsize + (n0 + t) * K, xs, K, out + t, LDO)
            BY_ROWS(nr, CALL)
#undef CALL
          });
    return y.y;
  }
  Prepared p = prepare(x, at::kFloat);
  const float* const* xs0 = reinterpret_cast<const float* const*>(p.rows.data());
  const int64_t seg = K / nseg;
  auto go = [&](auto make) {
    drive(g, N, xs0, y, kRun, [&](int64_t e, int64_t n0, int nt, const float* const* xs, int nr, float* out) {
      const float* sr = s ? s + (e * N + n0) * nseg : nullptr;
#define CALL(B)                                                                                        \
  for (int t = 0; t < nt; ++t) {                                                                     \
    const auto w = make(e, n0 + t);                                                                  \
    if (isa >= kAvx512) dot_avx512<B>(w, xs, K, seg, sr ? sr + t * nseg : nullptr, out + t, LDO);     \
    else avx2_row<B>(w, xs, K, seg, sr ? sr + t * nseg : nullptr, out + t, LDO);                     \
  }
      BY_ROWS(nr, CALL)
#undef CALL
    });
  };
  if (w.scalar_type() == at::kFloat) {
    const float* wp = w.data_ptr<float>();
    go([&](int64_t e, int64_t n) { return F32{wp + e * rowsize + n * K}; });
  } else if (w.scalar_type() == at::kBFloat16) {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
    go([&](int64_t e, int64_t n) { return BF16{wp + e * rowsize + n * K}; });
  } else {
    TORCH_CHECK(w.scalar_type() == at::kByte, "weights: fp32, bf16 or uint8 E4M3 bits");
    const uint8_t* wp = w.data_ptr<uint8_t>();
    go([&](int64_t e, int64_t n) { return FP8{wp + e * rowsize + n * K}; });
  }
  return y.y;
}

// w: [E, N, K] E4M3 bits in the unpack order (above); scales [E, N, nseg] fp32 (the dequantization scales)
at::Tensor gemv_fp8_bf16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& experts) {
  const int64_t K = w.size(-1), N = w.size(-2), R = x.size(0), nseg = scales.size(-1);
  TORCH_CHECK(K % 64 == 0 && K % nseg == 0 && (K / nseg) % 64 == 0, "K and its scale segments must be multiples of 64");
  TORCH_CHECK(x.size(1) == K && w.scalar_type() == at::kByte, "x has ", x.size(1), " columns, the weight ", K);
  const Groups g = group_rows(experts, R, stack_size(w));
  check_scales(scales, w, nseg);
  const Output y(R, N, x);
  Prepared p = prepare(x, at::kBFloat16);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const int64_t seg = K / nseg;
  drive(g, N, reinterpret_cast<const uint16_t* const*>(p.rows.data()), y, kRun,
        [&](int64_t e, int64_t n0, int nt, const uint16_t* const* xs, int nr, float* out) {
#define CALL(B)                                                                                        \
  for (int t = 0; t < nt; ++t) dot_fp8dp<B>(wp + (e * N + n0 + t) * K, xs, K, seg, sp + (e * N + n0 + t) * nseg, out + t, LDO)
          BY_ROWS(nr, CALL)
#undef CALL
        });
  return y.y;
}

// codes: [E, Np, Kp/2] in the block-transposed, row-interleaved order (Kp: K rounded up to 256, Np: N
// to kGroup, zero-padded); block_scales: [E, Np, Kp/16] E4M3 bits; scales: [E, N, 1] fp32; x: [R, K]
// fp32 or bf16
at::Tensor gemv_nvfp4_i8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& block_scales,
                         const at::Tensor& scales, const c10::optional<at::Tensor>& experts, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a CPU tensor [rows, K]");
  const int64_t Kp = codes.size(-1) * 2, Np = codes.size(-2), N = scales.size(-2), R = x.size(0), K = x.size(1);
  TORCH_CHECK(Kp % 256 == 0 && K <= Kp && Kp - K < 256, "codes must hold x's ", K, " columns in chunks of 256");
  TORCH_CHECK(codes.scalar_type() == at::kByte && block_scales.scalar_type() == at::kByte &&
                  block_scales.is_contiguous() && block_scales.numel() == codes.numel() / 8,
              "block scales: E4M3 bits, one per 16 weights");
  const Groups g = group_rows(experts, R, stack_size(codes));
  TORCH_CHECK(Np == (N + kGroup - 1) / kGroup * kGroup && codes.is_contiguous(), "codes must hold ", N,
              " rows in groups of ", kGroup);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == stack_size(codes) * N,
              "scales must be contiguous fp32, [E, N, 1]");
  const int64_t chunks = Kp / 256;
  const at::Tensor xc = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
  QuantizedRows xq{at::empty({R, Kp}, x.options().dtype(at::kChar)), at::empty({R, chunks * 16}, x.options().dtype(at::kFloat)),
                   at::empty({R, chunks * 16}, x.options().dtype(at::kInt))};
  for (int64_t r = 0; r < R; ++r) {
    int8_t* q = xq.q.data_ptr<int8_t>() + r * Kp;
    float* sc = xq.scale.data_ptr<float>() + r * chunks * 16;
    int32_t* base = xq.base.data_ptr<int32_t>() + r * chunks * 16;
    const float* xf = xc.scalar_type() == at::kFloat ? xc.data_ptr<float>() + r * K : nullptr;
    const uint16_t* xh = xf ? nullptr : reinterpret_cast<const uint16_t*>(xc.data_ptr()) + r * K;
    if (isa >= kAvx512Bf16) xf ? quantize_blocks(xf, K, chunks, q, sc, base) : quantize_blocks(xh, K, chunks, q, sc, base);
    else xf ? quantize_blocks_scalar(xf, K, chunks, q, sc, base) : quantize_blocks_scalar(xh, K, chunks, q, sc, base);
  }
  // the driver hands the tile pointers to its input rows' indices (the kernel reads three arrays by them)
  std::vector<int64_t> index(R);
  std::vector<const int64_t*> at(R);
  for (int64_t r = 0; r < R; ++r) { index[r] = r; at[r] = &index[r]; }
  const Output y(R, N, x);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* sp = block_scales.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  size_t most = 0;
  for (const auto& r : g.rows) most = std::max(most, r.size());
  const int step = most > 4 ? 2 : NT;   // rows a kernel call
  drive(g, N, at.data(), y, kNvfp4Run, [&](int64_t e, int64_t n0, int run, const int64_t* const* xs, int nr, float* out) {
    int64_t which[MAXR];
    for (int i = 0; i < nr; ++i) which[i] = *xs[i];
    for (int t0 = 0; t0 < run; t0 += step) {
      const int nt = std::min(step, run - t0);
      const uint8_t* rows[NT];
      const uint8_t* bs[NT];
      for (int t = 0; t < nt; ++t) {
        const int64_t n = n0 + t0 + t, group = e * Np + n / kGroup * kGroup, member = n % kGroup;
        rows[t] = cp + group * (Kp / 2) + member * 128;
        bs[t] = sp + group * (Kp / 16) + member * 16;
      }
      float* o = out + t0;
      if (isa >= kAvx512Bf16) {
#define CALL(A, B) dot_nvfp4_i8<A, B>(rows, bs, which, xq, chunks, o, LDO)
        BY_SHAPE(nt, nr, CALL)
#undef CALL
      } else {
        for (int t = 0; t < nt; ++t)
          for (int r0 = 0; r0 < nr; r0 += 4) {   // 16 registers: at most 4 rows a pass
            float part[4];
            switch (std::min(4, nr - r0)) {
              case 1: dot_nvfp4_i8_avx2<1>(rows[t], bs[t], which + r0, xq, chunks, part); break;
              case 2: dot_nvfp4_i8_avx2<2>(rows[t], bs[t], which + r0, xq, chunks, part); break;
              case 3: dot_nvfp4_i8_avx2<3>(rows[t], bs[t], which + r0, xq, chunks, part); break;
              default: dot_nvfp4_i8_avx2<4>(rows[t], bs[t], which + r0, xq, chunks, part);
            }
            for (int i = 0; i < std::min(4, nr - r0); ++i) o[(r0 + i) * LDO + t] = part[i];
          }
      }
    }
    for (int i = 0; i < nr; ++i)
      for (int t = 0; t < run; ++t) out[i * LDO + t] *= s[e * N + n0 + t];
  });
  return y.y;
}

// NVFP4 decoded to a float weight (prefill's GEMMs): packed [.., K/2] bytes (element 2j in the low
// nibble), block_scales [.., K/16] E4M3 bits, scale_2 fp32 (one value, or one per leading index of a
// 3-D stack) -> [.., K] fp32 or bf16: each E2M1 value times (block scale * scale_2), the fp32 products
// of the torch reference (`formats.nvfp4_dequantize`), then rounded to bf16 (nearest even) if asked.
AVX512BF16 void nvfp4_decode_row(const uint8_t* p, const uint8_t* bs, float s2, int64_t blocks, float* f32, uint16_t* bf16) {
  const __m512 table = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    const __m128i bytes = _mm_loadl_epi64((const __m128i*)(p + 8 * b));
    const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(bytes, _mm_set1_epi8(0x0F)),
                                            _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F)));
    const float step = FP8::value(bs[b]) * FP8::kScale * s2;   // block scale * scale_2
    const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), table), _mm512_set1_ps(step));
    if (f32) _mm512_storeu_ps(f32 + 16 * b, v);
    else _mm256_storeu_si256((__m256i*)(bf16 + 16 * b), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

at::Tensor nvfp4_decode(const at::Tensor& packed, const at::Tensor& block_scales, const at::Tensor& scale_2, bool bf16) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.device().is_cpu() &&
                  packed.dim() >= 1 && packed.size(-1) % 8 == 0,
              "packed: contiguous CPU bytes, a multiple of 8 a row");
  const int64_t blocks = packed.size(-1) / 8, rows = packed.numel() / packed.size(-1);
  TORCH_CHECK(block_scales.scalar_type() == at::kByte && block_scales.is_contiguous() && block_scales.numel() == rows * blocks,
              "block scales: E4M3 bits, one per 16 weights");
  const at::Tensor s2 = scale_2.to(at::kFloat).contiguous();
  TORCH_CHECK(s2.numel() == 1 || (packed.dim() == 3 && s2.numel() == packed.size(0)),
              "scale_2: one value, or one per expert of a [E, N, K/2] stack");
  std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end());
  shape.back() *= 2;
  at::Tensor out = at::empty(shape, packed.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint8_t* bs = block_scales.data_ptr<uint8_t>();
  const float* sp = s2.data_ptr<float>();
  const int64_t per_scale = rows / s2.numel();
  float* f32 = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* h = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      nvfp4_decode_row(p + r * blocks * 8, bs + r * blocks, sp[r / per_scale], blocks,
                       f32 ? f32 + r * blocks * 16 : nullptr, h ? h + r * blocks * 16 : nullptr);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(nemotron_cpu, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? scales, Tensor? experts, int isa) -> Tensor");
  m.def("gemv_fp8_bf16(Tensor x, Tensor w, Tensor scales, Tensor? experts) -> Tensor");
  m.def("gemv_nvfp4_i8(Tensor x, Tensor codes, Tensor block_scales, Tensor scales, Tensor? experts, int isa) -> Tensor");
  m.def("nvfp4_decode(Tensor packed, Tensor block_scales, Tensor scale_2, bool bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(nemotron_cpu, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_fp8_bf16", &gemv_fp8_bf16);
  m.impl("gemv_nvfp4_i8", &gemv_nvfp4_i8);
  m.impl("nvfp4_decode", &nvfp4_decode);
}
