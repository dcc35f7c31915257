// One Mamba-2 decode step after in_proj, in one call: the causal conv over the conv state and the new
// input, SiLU, dt = softplus(dt + dt_bias), the SSM state update and readout, the D skip and the
// gated grouped RMSNorm (`Mamba2Mixer.step` in nemotron/layers/mamba2.py, whose torch code is the
// reference). There a decode step's Mamba layer is ~40 small torch operations around two products,
// and their dispatch, not their arithmetic, is its cost at a few rows.
//
// The arithmetic is the reference's, in fp32: the state update is round(round(s * decay) +
// round(x dt * B)), as the reference's mul_ and addcmul_ round it; sums (the conv taps, the readout
// over the state size, the norm's mean square) run in another order, and exp is a polynomial within
// 2 ulp of torch's. The model's dtype (fp32 or bf16) is rounded to where the reference rounds: the
// conv state's inputs, the conv output, the scan output, the result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define AVX2 __attribute__((target("avx2,fma")))

enum Isa : int64_t { kAvx2 = 0, kAvx512 = 1 };   // the callers' codes (gemv.cpp's; AVX512-BF16 runs the AVX-512 path)

inline float bf16_round(float v) { return float(c10::BFloat16(v)); }

// exp(x) = 2^n p(r), n = round(x log2 e), r = x - n ln 2 (in two parts), p a degree-6 polynomial
// (Cephes' expf coefficients); x clamped to [-87.3, 88.7], the fp32 normal range
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

AVX512 __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

AVX2 __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n: n + 127 in the exponent bits (n >= -126 after the clamp)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#define OP512(name) _mm512_##name
#define OP256(name) _mm256_##name

// v / (1 + exp(-v)) in place over n values, W at a time (the tail through the C library's exp); one
// body for both instruction sets: VEC the vector type, OP(name) its intrinsic, EXP its exp
#define SILU(NAME, TARGET, VEC, W, OP, EXP)                                                           \
  TARGET void NAME(float* v, int64_t n) {                                                             \
    const VEC one = OP(set1_ps)(1.0f), zero = OP(setzero_ps)();                                       \
    int64_t i = 0;                                                                                    \
    for (; i + W <= n; i += W) {                                                                      \
      const VEC x = OP(loadu_ps)(v + i);                                                              \
      OP(storeu_ps)(v + i, OP(div_ps)(x, OP(add_ps)(one, EXP(OP(sub_ps)(zero, x)))));                 \
    }                                                                                                 \
    for (; i < n; ++i) v[i] = v[i] / (1.0f + std::exp(-v[i]));                                       \
  }

SILU(silu_avx512, AVX512, __m512, 16, OP512, exp512)
SILU(silu_avx2, AVX2, __m256, 8, OP256, exp256)

void silu(float* v, int64_t n, int64_t isa) {
  if (isa >= kAvx512) silu_avx512(v, n);
  else silu_avx2(v, n);
}

inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }   // torch's threshold 20

// the conv over one row: per channel, the K-1 stored inputs and this one (rounded to the state's
// dtype S) against the channel's K taps, plus the bias; the state moves on by one input. KC: K as a
// constant (Nemotron-H's 4, 2, 3: loops the compiler unrolls), or 0 for any K.
template <int KC, class S>
void conv_row(int64_t K_, S* state, const float* in, const float* w, const float* bias, int64_t C, float* out) {
  const int64_t K = KC > 0 ? KC : K_;
  for (int64_t c = 0; c < C; ++c, state += K - 1, w += K) {
    const S latest(in[c]);
    float sum = 0.0f;
    for (int64_t k = 0; k < K - 1; ++k) sum += float(state[k]) * w[k];
    sum += float(latest) * w[K - 1];
    for (int64_t k = 0; k + 1 < K - 1; ++k) state[k] = state[k + 1];
    state[K - 2] = latest;
    out[c] = bias ? sum + bias[c] : sum;
  }
}

template <class S>
void conv(int64_t K, S* state, const float* in, const float* w, const float* bias, int64_t C, float* out) {
  switch (K) {
    case 4: conv_row<4>(K, state, in, w, bias, C, out); return;
    case 2: conv_row<2>(K, state, in, w, bias, C, out); return;
    case 3: conv_row<3>(K, state, in, w, bias, C, out); return;
    default: conv_row<0>(K, state, in, w, bias, C, out);
  }
}

// the P rows of one head: s[p, :] = s * decay + xdt[p] * B (three roundings, as mul_ then addcmul_),
// y[p] = sum_n s[p, n] C[n]; N a multiple of W (the vector width), two accumulators a row. One body
// for both instruction sets: VEC is the vector type, OP(name) its intrinsic, HSUM its lane sum.
#define MAMBA_HEAD(NAME, TARGET, VEC, W, OP, HSUM)                                                    \
  TARGET void NAME(float* s, const float* xdt, const float* B, const float* C, float decay, int64_t P, \
                   int64_t N, float* y) {                                                             \
    const VEC d = OP(set1_ps)(decay);                                                                 \
    for (int64_t p = 0; p < P; ++p, s += N) {                                                         \
      const VEC xv = OP(set1_ps)(xdt[p]);                                                             \
      VEC acc[2] = {OP(setzero_ps)(), OP(setzero_ps)()};                                              \
      for (int64_t n = 0; n < N; n += W) {                                                            \
        const VEC a = OP(add_ps)(OP(mul_ps)(OP(loadu_ps)(s + n), d), OP(mul_ps)(xv, OP(loadu_ps)(B + n))); \
        OP(storeu_ps)(s + n, a);                                                                      \
        acc[(n / W) & 1] = OP(fmadd_ps)(a, OP(loadu_ps)(C + n), acc[(n / W) & 1]);                    \
      }                                                                                               \
      y[p] = HSUM(OP(add_ps)(acc[0], acc[1]));                                                        \
    }                                                                                                 \
  }

AVX2 inline float hsum256(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

MAMBA_HEAD(head_avx512, AVX512, __m512, 16, OP512, _mm512_reduce_add_ps)
MAMBA_HEAD(head_avx2, AVX2, __m256, 8, OP256, hsum256)

// a small parameter as contiguous fp32: itself when it is (no copy), else converted
struct Floats {
  at::Tensor t;
  const float* p;
  explicit Floats(const at::Tensor& src) : t(src.to(at::kFloat).contiguous()), p(t.data_ptr<float>()) {}
};

// zxbcdt [b, inner + conv_dim + heads] (fp32 or bf16, the in_proj output); conv_state [b, conv_dim, K-1]
// (fp32 or bf16) and ssm_state [b, heads, head_dim, state] (fp32) updated in place; returns the gated
// norm's output [b, inner] in zxbcdt's dtype (out_proj's input)
at::Tensor mamba_step(const at::Tensor& zxbcdt, at::Tensor& conv_state, at::Tensor& ssm_state,
                      const at::Tensor& conv_weight, const c10::optional<at::Tensor>& conv_bias,
                      const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& D,
                      const at::Tensor& norm_weight, int64_t groups, int64_t norm_groups, double dt_min,
                      double dt_max, double eps, int64_t isa) {
  const int64_t b = zxbcdt.size(0), H = ssm_state.size(1), P = ssm_state.size(2), N = ssm_state.size(3);
  const int64_t inner = H * P, C = conv_state.size(1), K = conv_state.size(2) + 1, width = inner + C + H;
  const bool bf16 = zxbcdt.scalar_type() == at::kBFloat16, conv16 = conv_state.scalar_type() == at::kBFloat16;
  TORCH_CHECK(zxbcdt.dim() == 2 && zxbcdt.is_contiguous() && (bf16 || zxbcdt.scalar_type() == at::kFloat) &&
                  zxbcdt.size(1) == width,
              "zxbcdt: contiguous fp32 or bf16 [b, inner + conv_dim + heads]");
  TORCH_CHECK(ssm_state.scalar_type() == at::kFloat && ssm_state.is_contiguous() && ssm_state.size(0) == b &&
                  N % 16 == 0,
              "ssm_state: contiguous fp32 [b, heads, head_dim, state], state a multiple of 16");
  TORCH_CHECK(conv_state.is_contiguous() && conv_state.size(0) == b && C == inner + 2 * groups * N &&
                  K >= 2 && (conv16 || conv_state.scalar_type() == at::kFloat),
              "conv_state: contiguous fp32 or bf16 [b, conv_dim, K-1]");
  TORCH_CHECK(conv_weight.numel() == C * K && inner % norm_groups == 0 && H % groups == 0,
              "conv weight [conv_dim, 1, K]; heads and channels divisible by their groups");
  const Floats w(conv_weight), dtb(dt_bias), alog(A_log), dskip(D), nw(norm_weight);
  const std::optional<Floats> bias = conv_bias ? std::optional<Floats>(Floats(*conv_bias)) : std::nullopt;
  at::Tensor out = at::empty({b, inner}, zxbcdt.options());
  const at::Tensor in32 = bf16 ? zxbcdt.to(at::kFloat) : zxbcdt;   // z, xBC, dt as fp32
  const float* in = in32.data_ptr<float>();

  // per row: the conv output x (for the D skip), B and C, the decays, x dt
  const int64_t BC = 2 * groups * N;
  std::vector<float> xbc(b * C), decay(b * H), xdt(b * inner);
  for (int64_t r = 0; r < b; ++r) {
    const float* row = in + r * width;
    float* x = xbc.data() + r * C;
    if (conv16) conv(K, conv_state.data_ptr<c10::BFloat16>() + r * C * (K - 1), row + inner, w.p, bias ? bias->p : nullptr, C, x);
    else conv(K, conv_state.data_ptr<float>() + r * C * (K - 1), row + inner, w.p, bias ? bias->p : nullptr, C, x);
    silu(x, C, isa);
    if (bf16) for (int64_t c = 0; c < C; ++c) x[c] = bf16_round(x[c]);   // stored in the model dtype
    for (int64_t h = 0; h < H; ++h) {
      float dt = softplus(row[inner + C + h] + dtb.p[h]);
      if (dt_min != 0.0 || dt_max != INFINITY) dt = std::min(std::max(dt, float(dt_min)), float(dt_max));
      decay[r * H + h] = std::exp(dt * -std::exp(alog.p[h]));
      for (int64_t p = 0; p < P; ++p) xdt[r * inner + h * P + p] = x[h * P + p] * dt;
    }
  }

  // the state, the largest tensor of the step: heads split over threads
  std::vector<float> y(b * inner);
  const int64_t per_group = H / groups, grain = std::max<int64_t>(1, (64 * 1024) / (P * N));
  float* state = ssm_state.data_ptr<float>();
  at::parallel_for(0, b * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / H, h = item % H, g = h / per_group;
      const float* Bg = xbc.data() + r * C + inner + g * N;
      const float* Cg = xbc.data() + r * C + inner + BC / 2 + g * N;
      float* s = state + item * P * N;
      if (isa >= kAvx512) head_avx512(s, xdt.data() + r * inner + h * P, Bg, Cg, decay[item], P, N, y.data() + r * inner + h * P);
      else head_avx2(s, xdt.data() + r * inner + h * P, Bg, Cg, decay[item], P, N, y.data() + r * inner + h * P);
    }
  });

  // the D skip, rounded to the model dtype; then w * rmsnorm_group(y * silu(z)) in fp32, rounded once
  const int64_t gs = inner / norm_groups;
  std::vector<float> gated(inner);
  for (int64_t r = 0; r < b; ++r) {
    std::copy(in + r * width, in + r * width + inner, gated.begin());
    silu(gated.data(), inner, isa);
    const float* x = xbc.data() + r * C;
    const float* yr = y.data() + r * inner;
    for (int64_t h = 0; h < H; ++h) {
      const float d = dskip.p[h];
      for (int64_t j = h * P; j < (h + 1) * P; ++j) {
        const float v = yr[j] + x[j] * d;
        gated[j] *= bf16 ? bf16_round(v) : v;
      }
    }
    float* o32 = bf16 ? nullptr : out.data_ptr<float>() + r * inner;
    c10::BFloat16* o16 = bf16 ? out.data_ptr<c10::BFloat16>() + r * inner : nullptr;
    for (int64_t g = 0; g < norm_groups; ++g) {
      float sq = 0.0f;
      for (int64_t j = g * gs; j < (g + 1) * gs; ++j) sq += gated[j] * gated[j];
      const float rstd = 1.0f / std::sqrt(sq / float(gs) + float(eps));
      for (int64_t j = g * gs; j < (g + 1) * gs; ++j) {
        const float v = nw.p[j] * (gated[j] * rstd);
        if (o16) o16[j] = c10::BFloat16(v);
        else o32[j] = v;
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nemotron_cpu, m) {
  m.def("mamba_step(Tensor zxbcdt, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor conv_weight, "
        "Tensor? conv_bias, Tensor dt_bias, Tensor A_log, Tensor D, Tensor norm_weight, int groups, "
        "int norm_groups, float dt_min, float dt_max, float eps, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(nemotron_cpu, CPU, m) { m.impl("mamba_step", &mamba_step); }
