// Per-row tile kernels of the contrastive KD loss, written once and compiled twice.
//
// contrastive_kd.cpp includes this file inside `namespace caad::generic` (the compiler's baseline
// ISA) and, on x86-64, again inside `namespace caad::avx2` under `#pragma GCC target("avx2,fma,f16c")`,
// then picks one set at run time (`__builtin_cpu_supports`). The shared library therefore runs on any
// x86-64 CPU and needs no CPU model in its build-cache key. Everything here works on raw pointers and
// float32 tiles; OpenMP threading lives in the includer (an OpenMP region outlined from a function
// with a target attribute is a compiler corner we do not rely on), only `#pragma omp simd` is used here.
//
// Requires, before inclusion: <cstdint>, <cfloat>, <cmath>, c10::Half, <immintrin.h> when
// CAAD_TILES_F16C is defined, and the shared definitions of contrastive_kd.cpp: `kTile`, `DType`,
// `dtype_size`, `Divergence`, `TempMode`, `Src`, `RowJob`, `Partial`, `RowStats`, `merge_partial` and the
// row-flag bits `kFlagStudent`, `kFlagTeacher`, `kFlagNegative`.
//
// Conventions (docs/math.md): s and z are the logits after each path's scale and softcap; a = z_hat / tau
// with cut-off tokens and z_pos = -inf tokens at -inf; b = s / tau; all sums in float32. Running maxima start at -FLT_MAX instead of -inf so that
// differences of maxima are never inf - inf; a tile whose teacher entries are all -inf has sum 0.

#define CAAD_INLINE inline __attribute__((always_inline))

CAAD_INLINE float bits_float(uint32_t u) { return __builtin_bit_cast(float, u); }
CAAD_INLINE uint32_t float_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// exp(x) within ~2 ulp on [-87.3, 88]; exactly 0 below (-inf included); clamps above 88 (the
// kernels only exponentiate differences to a maximum, <= 0). Branch-free so loops vectorise:
// x = n ln2 + r with |r| <= ln2/2 (round-to-nearest through the 1.5 * 2^23 trick), a degree-6
// Taylor polynomial of exp(r), and 2^n assembled in the exponent bits.
CAAD_INLINE float vexp(float x) {
  constexpr float kLo = -87.3f, kHi = 88.0f, kShift = 12582912.0f;  // 1.5 * 2^23
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  const float t = xc * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  const int32_t ni = static_cast<int32_t>(float_bits(t) - float_bits(kShift));
  float r = xc - n * 0.693145751953125f;  // ln2 split in two: the high part times n is exact
  r = r - n * 1.428606820309417e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_float(static_cast<uint32_t>(ni + 127) << 23);
  return x < kLo ? 0.0f : p * scale;
}

// log(y) for y in [1, 2] (used as log1p of a value in [0, 1]): y = 2^k m with m in [1/sqrt2, sqrt2],
// log m = 2 atanh(z), z = (m - 1) / (m + 1), |z| <= 0.172, five odd terms (error < 1e-9).
CAAD_INLINE float vlog_1_2(float y) {
  const bool big = y > 1.41421356f;
  const float m = big ? y * 0.5f : y;
  const float z = (m - 1.0f) / (m + 1.0f);
  const float z2 = z * z;
  float s = 2.0f / 9.0f;
  s = s * z2 + 2.0f / 7.0f;
  s = s * z2 + 2.0f / 5.0f;
  s = s * z2 + 2.0f / 3.0f;
  s = s * z2 + 2.0f;
  s = s * z;
  return big ? s + 0.693147180559945f : s;
}

// log(exp(u) + exp(w)) for w finite (u may be -inf).
CAAD_INLINE float vlogaddexp(float u, float w) {
  const float hi = u > w ? u : w;
  const float lo = u > w ? w : u;
  return hi + vlog_1_2(1.0f + vexp(lo - hi));
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): absolute error ~1e-7, exactly +-1 for large |x|.
CAAD_INLINE float vtanh(float x) {
  const float ax = x < 0.f ? -x : x;
  const float e = vexp(-2.0f * ax);
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.f ? -t : t;
}

// x <- softcap(scale * x) in place: cap * tanh(scale * x / cap) when cap > 0, else scale * x; -inf stays -inf.
static void transform_tile(float* __restrict x, int64_t n, float scale, float cap) {
  if (cap > 0.f) {
    const float inv_cap = 1.0f / cap;
    const float ninf = -INFINITY;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float xs = x[j] * scale;
      x[j] = xs == ninf ? ninf : cap * vtanh(xs * inv_cap);
    }
  } else if (scale != 1.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] *= scale;
  }
}

// 1 when a raw tile holds NaN or +inf (!(x < inf) catches both), else 0.
CAAD_INLINE int tile_not_finite_above(const float* __restrict x, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) bad |= !(x[j] < INFINITY) ? 1 : 0;
  return bad;
}

// ---------------------------------------------------------------------------------------------
// tile loads and stores: any supported dtype <-> float32

static void load_tile(const void* src, DType dt, int64_t n, float* __restrict dst) {
  switch (dt) {
    case DType::kF32: {
      const float* __restrict p = static_cast<const float*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = p[j];
      break;
    }
    case DType::kBF16: {
      const uint16_t* __restrict p = static_cast<const uint16_t*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = bits_float(static_cast<uint32_t>(p[j]) << 16);
      break;
    }
    case DType::kF16: {
      const c10::Half* __restrict p = static_cast<const c10::Half*>(src);
      int64_t j = 0;
#ifdef CAAD_TILES_F16C
      for (; j + 8 <= n; j += 8) {
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))));
      }
#endif
      for (; j < n; ++j) dst[j] = static_cast<float>(p[j]);
      break;
    }
  }
}

static void store_tile(const float* __restrict src, int64_t n, DType dt, void* dst) {
  switch (dt) {
    case DType::kF32: {
      float* __restrict q = static_cast<float*>(dst);
      for (int64_t j = 0; j < n; ++j) q[j] = src[j];
      break;
    }
    case DType::kBF16: {
      uint16_t* __restrict q = static_cast<uint16_t*>(dst);
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t u = float_bits(src[j]);
        const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
        q[j] = static_cast<uint16_t>(src[j] != src[j] ? 0x7fc0u : rounded);
      }
      break;
    }
    case DType::kF16: {
      c10::Half* __restrict q = static_cast<c10::Half*>(dst);
      int64_t j = 0;
#ifdef CAAD_TILES_F16C
      for (; j + 8 <= n; j += 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
      }
#endif
      for (; j < n; ++j) q[j] = c10::Half(src[j]);
      break;
    }
  }
}

static void zero_tile(int64_t n, DType dt, void* dst) {
  std::memset(dst, 0, static_cast<size_t>(n) * dtype_size(dt));
}

// a = z_hat / tau over columns [c0, c0 + n) of `row`; `scratch` holds kTile floats. Both teacher paths go
// through the teacher's scale and softcap first; z_hat = z_pos + alpha (z_pos - z_neg). With `flags`, the raw
// tiles are screened for the row flags (NaN/+inf, and -inf in z_neg where z_pos is finite).
static void teacher_tile(const RowJob& job, int64_t row, int64_t c0, int64_t n, float zthr,
                         float* __restrict a, float* __restrict scratch, int* flags = nullptr) {
  load_tile(job.zpos.at(row, c0), job.zpos.dt, n, a);
  const float inv_t = job.inv_temperature;
  if (flags != nullptr && tile_not_finite_above(a, n)) *flags |= kFlagTeacher;
  transform_tile(a, n, job.teacher_scale, job.teacher_cap);
  if (job.has_negative) {
    load_tile(job.zneg.at(row, c0), job.zneg.dt, n, scratch);
    if (flags != nullptr) {
      int bad = 0;
      const float ninf = -INFINITY;
#pragma omp simd reduction(| : bad)
      for (int64_t j = 0; j < n; ++j) bad |= (!(scratch[j] < INFINITY) || (scratch[j] == ninf && a[j] != ninf)) ? 1 : 0;
      if (bad) *flags |= kFlagNegative;
    }
    transform_tile(scratch, n, job.teacher_scale, job.teacher_cap);
    const float alpha = job.alpha_rows != nullptr ? job.alpha_rows[row] : job.alpha;
    const float ninf = -INFINITY;
    if (job.cutoff) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float zp = a[j];
        a[j] = zp < zthr || zp == ninf ? ninf : (zp + alpha * (zp - scratch[j])) * inv_t;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float zp = a[j];
        a[j] = zp == ninf ? ninf : (zp + alpha * (zp - scratch[j])) * inv_t;
      }
    }
  } else if (job.cutoff) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) a[j] = a[j] < zthr ? -INFINITY : a[j] * inv_t;
  } else if (inv_t != 1.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) a[j] *= inv_t;
  }
}

// The student tile s = softcap(scale * x) over columns [c0, c0 + n); with `flags`, screened first.
static void student_tile(const RowJob& job, int64_t row, int64_t c0, int64_t n, float* __restrict s,
                         int* flags = nullptr) {
  load_tile(job.student.at(row, c0), job.student.dt, n, s);
  if (flags != nullptr && tile_not_finite_above(s, n)) *flags |= kFlagStudent;
  transform_tile(s, n, job.student_scale, job.student_cap);
}

CAAD_INLINE float tile_max(const float* __restrict x, int64_t n) {
  float m = -FLT_MAX;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// ---------------------------------------------------------------------------------------------
// forward

// max raw z_pos over columns [c0, c1) of `row` (the plausibility cutoff's first sweep); the transform is
// monotone, so the caller applies it to this maximum.
static float zmax_unit(const RowJob& job, int64_t row, int64_t c0, int64_t c1) {
  alignas(64) float buf[kTile];
  float m = -INFINITY;
  for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
    const int64_t n = c1 - j0 < kTile ? c1 - j0 : kTile;
    load_tile(job.zpos.at(row, j0), job.zpos.dt, n, buf);
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = buf[j] > m ? buf[j] : m;
  }
  return m;
}

// Sums of one tile relative to the tile's own maxima (ma of a, ms of s). For forward KL
// w = sum e_a ((a - ma) - (b - mb)); for reverse KL w = sum e_b ((b - mb) - (a - ma)); with
// mb = ms / tau. Terms with zero weight are skipped by a select (never 0 * inf). The student's
// sum at temperature 1 reuses exp(b) when tau is 1 (equal) or 2 (exp(s - ms) = exp(b - mb)^2).
template <Divergence Div, TempMode Mode>
static Partial tile_sums(const float* __restrict a, const float* __restrict s, int64_t n, float inv_t) {
  Partial t;
  t.ma = tile_max(a, n);
  t.ms = tile_max(s, n);
  const float ma = t.ma, ms = t.ms;
  float sa = 0.f, sb = 0.f, ss = 0.f, w = 0.f;
#pragma omp simd reduction(+ : sa, sb, ss, w)
  for (int64_t j = 0; j < n; ++j) {
    const float da = a[j] - ma;
    const float ds = s[j] - ms;
    const float db = Mode == TempMode::kUnit ? ds : (Mode == TempMode::kHalf ? ds * 0.5f : ds * inv_t);
    const float ea = vexp(da);
    const float eb = vexp(db);
    sa += ea;
    sb += eb;
    ss += Mode == TempMode::kUnit ? eb : (Mode == TempMode::kHalf ? eb * eb : vexp(ds));
    if constexpr (Div == Divergence::kForward) w += ea > 0.f ? ea * (da - db) : 0.f;
    if constexpr (Div == Divergence::kReverse) w += eb > 0.f ? eb * (db - da) : 0.f;
  }
  t.sa = sa;
  t.sb = sb;
  t.ss = ss;
  t.w = w;
  return t;
}

template <Divergence Div>
static Partial tile_sums_any(const float* __restrict a, const float* __restrict s, int64_t n, float inv_t) {
  if (inv_t == 1.0f) return tile_sums<Div, TempMode::kUnit>(a, s, n, inv_t);
  if (inv_t == 0.5f) return tile_sums<Div, TempMode::kHalf>(a, s, n, inv_t);
  return tile_sums<Div, TempMode::kGeneral>(a, s, n, inv_t);
}

// One sweep over columns [c0, c1) of `row`: the online softmax state of a, b and s, and the
// divergence accumulator (forward and reverse KL). `zthr` is the cutoff threshold on z_pos.
static Partial main_unit(const RowJob& job, int64_t row, int64_t c0, int64_t c1, float zthr) {
  alignas(64) float abuf[kTile];
  alignas(64) float sbuf[kTile];
  alignas(64) float scratch[kTile];
  Partial acc;
  const float inv_t = job.inv_temperature;
  for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
    const int64_t n = c1 - j0 < kTile ? c1 - j0 : kTile;
    student_tile(job, row, j0, n, sbuf, &acc.flags);
    teacher_tile(job, row, j0, n, zthr, abuf, scratch, &acc.flags);
    Partial t;
    switch (job.divergence) {
      case Divergence::kForward:
        t = tile_sums_any<Divergence::kForward>(abuf, sbuf, n, inv_t);
        break;
      case Divergence::kReverse:
        t = tile_sums_any<Divergence::kReverse>(abuf, sbuf, n, inv_t);
        break;
      default:
        t = tile_sums_any<Divergence::kMixture>(abuf, sbuf, n, inv_t);
        break;
    }
    t.flags = acc.flags;
    merge_partial(acc, t, inv_t, job.divergence);
  }
  return acc;
}

// The mixture's second sweep: sum p log(p/m) and sum q log(q/m) over columns [c0, c1), with
// log p = (a - ma) - log Sa and log q = (s - ms)/tau - log Sb from the first sweep's state
// (better conditioned than a - lse_a for large logits); log m by logaddexp, finite wherever
// q > 0, so neither sum ever forms 0 * inf.
static void mixture_unit(const RowJob& job, int64_t row, int64_t c0, int64_t c1, float zthr, const Partial& st,
                         float* kl_pm, float* kl_qm) {
  alignas(64) float abuf[kTile];
  alignas(64) float sbuf[kTile];
  alignas(64) float scratch[kTile];
  const float inv_t = job.inv_temperature;
  const float ma = st.ma, log_sa = std::log(st.sa), ms = st.ms, log_sb = std::log(st.sb);
  const float lbeta = job.log_beta, l1mbeta = job.log_one_minus_beta;
  float pm = 0.f, qm = 0.f;
  for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
    const int64_t n = c1 - j0 < kTile ? c1 - j0 : kTile;
    student_tile(job, row, j0, n, sbuf);
    teacher_tile(job, row, j0, n, zthr, abuf, scratch);
#pragma omp simd reduction(+ : pm, qm)
    for (int64_t j = 0; j < n; ++j) {
      const float lp = (abuf[j] - ma) - log_sa;
      const float lq = (sbuf[j] - ms) * inv_t - log_sb;
      const float p = vexp(lp);
      const float q = vexp(lq);
      const float lm = vlogaddexp(lp + lbeta, lq + l1mbeta);
      pm += p > 0.f ? p * (lp - lm) : 0.f;
      qm += q > 0.f ? q * (lq - lm) : 0.f;
    }
  }
  *kl_pm = pm;
  *kl_qm = qm;
}

// ---------------------------------------------------------------------------------------------
// backward

// From d/ds (s the transformed student) to d/dx (the raw logits): times scale (1 - (s / cap)^2) with a cap,
// scale without one; 0 where s = -inf (q = 0 there, and the factor would be -inf).
static void chain_student(const RowJob& job, const float* __restrict s, float* __restrict g, int64_t n) {
  const float scale = job.student_scale, cap = job.student_cap;
  if (cap > 0.f) {
    const float inv_cap = 1.0f / cap;
    const float ninf = -INFINITY;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float t = s[j] * inv_cap;
      g[j] = s[j] == ninf ? 0.f : g[j] * (scale * (1.0f - t * t));
    }
  } else if (scale != 1.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] *= scale;
  }
}

// grad[row, c0:c1] = coef_kd * d kd / d s + coef_ce * d ce / d s, written tile by tile into
// `grad_row` (the row's start, dtype `job.grad_dt`). Each tile of the student is read into a
// float buffer before the same columns are written, so `grad` may alias the student.
// The log-probabilities are formed as in RowStats: log p = (a - shift_a) - off_a,
// log q = (s - shift_s) / tau - off_b, log softmax(s) = (s - shift_s) - off_s.
static void backward_unit(const RowJob& job, int64_t row, int64_t c0, int64_t c1, const RowStats& st,
                          void* grad_row) {
  alignas(64) float abuf[kTile];
  alignas(64) float sbuf[kTile];
  alignas(64) float gbuf[kTile];
  const size_t gsize = dtype_size(job.grad_dt);
  char* grad_base = static_cast<char*>(grad_row);
  if (st.coef_kd == 0.f && st.coef_ce == 0.f) {
    zero_tile(c1 - c0, job.grad_dt, grad_base + c0 * gsize);
    return;
  }
  const float inv_t = job.inv_temperature;
  const float k = st.coef_kd * inv_t;
  const float shift_a = st.shift_a, off_a = st.off_a, shift_s = st.shift_s;
  const float off_b = st.off_b, off_s = st.off_s, kl = st.kl_aux;
  const float lbeta = job.log_beta, l1mbeta = job.log_one_minus_beta;
  const float k_mix = k * (1.0f - job.beta);
  const float cce = st.coef_ce;
  const bool ce_from_q = cce != 0.f && (inv_t == 1.0f || inv_t == 0.5f);
  for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
    const int64_t n = c1 - j0 < kTile ? c1 - j0 : kTile;
    student_tile(job, row, j0, n, sbuf);
    if (k != 0.f) {
      teacher_tile(job, row, j0, n, st.zthr, abuf, gbuf);  // gbuf doubles as scratch here
      switch (job.divergence) {
        case Divergence::kForward:
          if (ce_from_q) {
            // softmax(s) = exp((s - shift_s) - off_s) = q^2 exp(2 off_b - off_s) at tau = 2 (q itself
            // at tau = 1, where off_b = off_s)
            const float c = inv_t == 1.0f ? cce : cce * std::exp(2.0f * off_b - off_s);
            const bool square = inv_t != 1.0f;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
              const float q = vexp((sbuf[j] - shift_s) * inv_t - off_b);
              gbuf[j] = k * (q - vexp((abuf[j] - shift_a) - off_a)) + c * (square ? q * q : q);
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
              gbuf[j] = k * (vexp((sbuf[j] - shift_s) * inv_t - off_b) - vexp((abuf[j] - shift_a) - off_a));
            }
          }
          break;
        case Divergence::kReverse:
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const float lq = (sbuf[j] - shift_s) * inv_t - off_b;
            const float q = vexp(lq);
            gbuf[j] = q > 0.f ? k * q * (lq - ((abuf[j] - shift_a) - off_a) - kl) : 0.f;
          }
          break;
        default:
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const float lq = (sbuf[j] - shift_s) * inv_t - off_b;
            const float q = vexp(lq);
            const float lm = vlogaddexp(((abuf[j] - shift_a) - off_a) + lbeta, lq + l1mbeta);
            gbuf[j] = q > 0.f ? k_mix * q * (lq - lm - kl) : 0.f;
          }
          break;
      }
      if (cce != 0.f && !(ce_from_q && job.divergence == Divergence::kForward)) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) gbuf[j] += cce * vexp((sbuf[j] - shift_s) - off_s);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) gbuf[j] = cce * vexp((sbuf[j] - shift_s) - off_s);
    }
    if (st.label >= j0 && st.label < j0 + n) gbuf[st.label - j0] -= cce;
    chain_student(job, sbuf, gbuf, n);
    store_tile(gbuf, n, job.grad_dt, grad_base + j0 * gsize);
  }
}

#undef CAAD_INLINE
