// C++ (OpenMP) CPU row kernels of the contrastive KD loss: the "cpp" backend of caad_kernels.
//
// Contract: caad_kernels/backends/__init__.py. Inputs are [B, T, V] views with unit last-dim
// stride (row r = b * T + t at b * stride(0) + t * stride(1)); the teacher may be wider than the
// student (only the first `vocab` columns are read). float32, bfloat16 and float16 inputs, each
// tensor its own dtype; tiles are converted to float32 and every sum is accumulated in float32.
//
// Work is split into units (row, column segment). With at least as many rows as threads a unit is
// a whole row and each row runs all its sweeps back to back (the row stays in cache); with fewer
// rows each row is split into segments, one sweep at a time, and the partial states are merged.
// Forward and reverse KL take one sweep per row (an online softmax with the recurrence
// W' = exp(da) (W + S (da - db)) when the maxima move by da, db); the plausibility cutoff adds a
// first sweep for max z_pos, the mixture a second sweep once lse_a and lse_b are known.
// Rows whose label is ignore_index are skipped: kd = ce = 0, stats 0, gradient 0, never read.
// Each path's logits go through its scale and softcap first (student and both teacher paths); the kernels
// flag NaN/+inf inputs and bad labels per row while they read the rows (kd, ce, stats NaN for those rows).
// loss_and_grad (coefficients known in advance) runs a row's gradient sweep right after its forward
// sweeps while the row is still in cache, with log p and log q taken from the row's maxima and sums
// rather than from the rounded lse; split rows write gradients only after all segments have merged.
// An optional per-row column limit (int64 [rows]) restricts row r to columns [0, min(limit_r, vocab)): the
// columns at or past it are never read, count as -inf in every path and get a zero gradient; a row whose
// limit is <= 0 is ignored like an ignore_index row. Without it every row spans the vocabulary.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

// The AVX2 copy of the tile kernels relies on GCC's `#pragma GCC target`; other compilers (clang
// ignores that pragma) build the baseline kernels only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define CAAD_HAVE_AVX2_BUILD 1
#endif

namespace caad {

constexpr int64_t kTile = 2048;             // columns per float32 tile (8 KiB per buffer)
constexpr int64_t kMinSegmentColumns = 4096;  // never split a row into pieces smaller than this
constexpr int64_t kIgnored = -2;              // row label marker: ignore_index (-1: no label)
// Row flags (caad_kernels.validation): NaN/+inf in a path, -inf in z_neg where z_pos is finite, a bad label.
constexpr int kFlagStudent = 1, kFlagTeacher = 2, kFlagNegative = 4, kFlagLabel = 8;

enum class DType : int { kF32, kBF16, kF16 };
enum class Divergence : int { kForward, kReverse, kMixture };
// How the temperature-1 student sum is obtained from exp(b): tau = 1, tau = 2, or a third exp.
enum class TempMode : int { kUnit, kHalf, kGeneral };

inline size_t dtype_size(DType dt) { return dt == DType::kF32 ? 4 : 2; }

// A strided [B, T, V] source: row r lives at base + (r / T) * sb + (r % T) * st elements.
struct Src {
  const char* base = nullptr;
  DType dt = DType::kF32;
  int64_t sb = 0, st = 0, seq = 1;

  const void* at(int64_t row, int64_t col) const {
    const int64_t b = row / seq, t = row - b * seq;
    return base + (b * sb + t * st + col) * static_cast<int64_t>(dtype_size(dt));
  }
};

// Everything a unit needs; plain data so that both ISA builds of the tile kernels can use it.
struct RowJob {
  Src student, zpos, zneg;
  bool has_negative = false, cutoff = false;
  float alpha = 0.f, inv_temperature = 1.f, beta = 0.f, log_plausibility = 0.f;
  float log_beta = 0.f, log_one_minus_beta = 0.f;
  const float* alpha_rows = nullptr;  // per-row alpha (float32 [rows]) or nullptr for `alpha`
  const int64_t* col_limit = nullptr;  // per-row column limit (int64 [rows]) or nullptr: the whole vocabulary
  // per-path logit transforms: x -> cap * tanh(scale * x / cap) (cap 0: scale * x only)
  float student_scale = 1.f, teacher_scale = 1.f, student_cap = 0.f, teacher_cap = 0.f;
  Divergence divergence = Divergence::kForward;
  DType grad_dt = DType::kF32;
};

// Online softmax state over some columns: maxima of a and s (mb = ms / tau), sums of exp relative
// to them, and the KL accumulator w (see contrastive_kd_tiles.h).
struct Partial {
  float ma = -FLT_MAX, ms = -FLT_MAX;
  float sa = 0.f, sb = 0.f, ss = 0.f, w = 0.f;
  int flags = 0;  // row flags found while reading these columns
};

// Per-row inputs of the gradient sweep. The log-probabilities are formed as
// log p = (a - shift_a) - off_a, log q = (s - shift_s) / tau - off_b, log softmax(s) = (s - shift_s) - off_s:
// from saved stats (backward) shift_a = lse_a, off_a = 0, shift_s = 0, off_b = lse_b, off_s = lse_s;
// in the fused pass, from the row's own state, shift_a = m_a, off_a = log S_a, shift_s = m_s,
// off_b = log S_b, off_s = log S_s, which avoids the rounding of lse = m + log S for large logits.
struct RowStats {
  float shift_a, off_a, shift_s, off_b, off_s, kl_aux, zthr, coef_kd, coef_ce;
  int64_t label;  // column of the CE one-hot, -1 when none
};

// Merge state `x` into `acc`: rescale both to the common maxima. A side with a zero sum adds
// nothing (its maxima may still be the -FLT_MAX sentinel, whose differences are not meaningful).
inline void merge_partial(Partial& acc, const Partial& x, float inv_t, Divergence div) {
  const float ma = std::max(acc.ma, x.ma), ms = std::max(acc.ms, x.ms);
  auto fold = [&](const Partial& p, float* sa, float* sb, float* ss, float* w) {
    const float da = p.ma - ma, ds = p.ms - ms, db = ds * inv_t;
    const float ea = p.sa > 0.f ? std::exp(da) : 0.f;
    const float eb = p.sb > 0.f ? std::exp(db) : 0.f;
    *sa += p.sa * ea;
    *sb += p.sb * eb;
    *ss += p.ss > 0.f ? p.ss * std::exp(ds) : 0.f;
    if (div == Divergence::kForward && p.sa > 0.f) *w += ea * (p.w + p.sa * (da - db));
    if (div == Divergence::kReverse && p.sb > 0.f) *w += eb * (p.w + p.sb * (db - da));
  };
  float sa = 0.f, sb = 0.f, ss = 0.f, w = 0.f;
  fold(acc, &sa, &sb, &ss, &w);
  fold(x, &sa, &sb, &ss, &w);
  acc = Partial{ma, ms, sa, sb, ss, w, acc.flags | x.flags};
}

// softcap(scale * x) of one value, as the tiles' transform_tile (with the library tanh).
inline float transform_scalar(float x, float scale, float cap) {
  const float xs = x * scale;
  if (cap <= 0.f || xs == -INFINITY) return xs;
  return cap * std::tanh(xs / cap);
}

namespace generic {
#include "contrastive_kd_tiles.h"
}  // namespace generic

#ifdef CAAD_HAVE_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CAAD_TILES_F16C 1
namespace avx2 {
#include "contrastive_kd_tiles.h"
}  // namespace avx2
#undef CAAD_TILES_F16C
#pragma GCC pop_options
#endif

// One ISA's set of unit kernels.
struct Kernels {
  const char* name;
  float (*zmax)(const RowJob&, int64_t, int64_t, int64_t);
  Partial (*main)(const RowJob&, int64_t, int64_t, int64_t, float);
  void (*mixture)(const RowJob&, int64_t, int64_t, int64_t, float, const Partial&, float*, float*);
  void (*backward)(const RowJob&, int64_t, int64_t, int64_t, const RowStats&, void*);
};

const Kernels kGeneric{"generic", generic::zmax_unit, generic::main_unit, generic::mixture_unit,
                       generic::backward_unit};
#ifdef CAAD_HAVE_AVX2_BUILD
const Kernels kAvx2{"avx2", avx2::zmax_unit, avx2::main_unit, avx2::mixture_unit, avx2::backward_unit};
#endif

const Kernels* best_kernels() {
#ifdef CAAD_HAVE_AVX2_BUILD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return &kAvx2;
  }
#endif
  return &kGeneric;
}

const Kernels* g_kernels = best_kernels();

// ---------------------------------------------------------------------------------------------
// argument handling

DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kF32;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kHalf:
      return DType::kF16;
    default:
      TORCH_CHECK_TYPE(false, "caad cpp backend: ", name, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type(), " (float64 inputs: use backend='torch', which accumulates in float64)");
  }
  return DType::kF32;
}

Src make_src(const at::Tensor& t, const char* name, int64_t batch, int64_t seq, int64_t vocab) {
  TORCH_CHECK(t.device().is_cpu(), "caad cpp backend: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, "caad cpp backend: ", name, " must be a [B, T, V] view, got ", t.dim(), " dims");
  TORCH_CHECK(t.size(0) == batch && t.size(1) == seq, "caad cpp backend: ", name, " has leading shape [",
              t.size(0), ", ", t.size(1), "], expected [", batch, ", ", seq, "]");
  TORCH_CHECK(t.size(2) >= vocab, "caad cpp backend: ", name, " is narrower (", t.size(2),
              ") than the vocabulary (", vocab, ")");
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) <= 1, "caad cpp backend: ", name, " needs a unit last-dim stride");
  Src s;
  s.base = static_cast<const char*>(t.data_ptr());
  s.dt = to_dtype(t, name);
  s.sb = t.stride(0);
  s.st = t.stride(1);
  s.seq = std::max<int64_t>(seq, 1);
  return s;
}

// `scalars` = [alpha, inv_temperature, beta, log_plausibility, student_scale, teacher_scale, student_cap,
// teacher_cap] (a cap of 0 is off); `alpha_rows` a float32 [rows] tensor replacing alpha per row; `col_limit`
// an int64 [rows] tensor of per-row column limits.
RowJob make_job(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& negative,
                const std::optional<at::Tensor>& alpha_rows, const std::optional<at::Tensor>& col_limit,
                const std::vector<double>& scalars, bool cutoff, int64_t vocab) {
  TORCH_CHECK(scalars.size() == 8, "caad cpp backend: expected 8 scalars, got ", scalars.size());
  const double alpha = scalars[0], inv_temperature = scalars[1], beta = scalars[2], log_plausibility = scalars[3];
  TORCH_CHECK(student.dim() == 3, "caad cpp backend: student must be a [B, T, V] view");
  TORCH_CHECK(vocab >= 1 && student.size(2) == vocab, "caad cpp backend: vocab_size ", vocab,
              " must equal the student's width ", student.size(2));
  TORCH_CHECK(inv_temperature > 0, "caad cpp backend: inv_temperature must be > 0");
  TORCH_CHECK(beta >= 0 && beta <= 1, "caad cpp backend: beta must be in [0, 1]");
  TORCH_CHECK(!(cutoff && beta == 1.0), "caad cpp backend: reverse KL with a plausibility cutoff is infinite");
  TORCH_CHECK(scalars[4] > 0 && scalars[5] > 0, "caad cpp backend: logit scales must be > 0");
  const int64_t batch = student.size(0), seq = student.size(1);
  RowJob job;
  job.student = make_src(student, "student", batch, seq, vocab);
  job.zpos = make_src(teacher, "teacher", batch, seq, vocab);
  job.has_negative = negative.has_value();
  if (job.has_negative) job.zneg = make_src(*negative, "negative", batch, seq, vocab);
  if (alpha_rows.has_value()) {
    const at::Tensor& a = *alpha_rows;
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.is_contiguous() && a.numel() == batch * seq,
                "caad cpp backend: alpha_rows must be a contiguous float32 CPU tensor of ", batch * seq, " elements");
    job.alpha_rows = a.data_ptr<float>();
  }
  if (col_limit.has_value()) {
    const at::Tensor& c = *col_limit;
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kLong && c.is_contiguous() && c.numel() == batch * seq,
                "caad cpp backend: col_limit must be a contiguous int64 CPU tensor of ", batch * seq, " elements");
    job.col_limit = c.data_ptr<int64_t>();
  }
  job.cutoff = cutoff;
  job.alpha = static_cast<float>(alpha);
  job.inv_temperature = static_cast<float>(inv_temperature);
  job.beta = static_cast<float>(beta);
  job.log_plausibility = static_cast<float>(log_plausibility);
  job.student_scale = static_cast<float>(scalars[4]);
  job.teacher_scale = static_cast<float>(scalars[5]);
  job.student_cap = static_cast<float>(scalars[6]);
  job.teacher_cap = static_cast<float>(scalars[7]);
  job.divergence = beta == 0.0 ? Divergence::kForward : (beta == 1.0 ? Divergence::kReverse : Divergence::kMixture);
  if (job.divergence == Divergence::kMixture) {
    job.log_beta = static_cast<float>(std::log(beta));
    job.log_one_minus_beta = static_cast<float>(std::log1p(-beta));
  }
  job.grad_dt = job.student.dt;
  return job;
}

// The number of columns row `row` reads: the vocabulary, or its column limit clamped to [0, vocab].
inline int64_t row_columns(const RowJob& job, int64_t row, int64_t vocab) {
  if (job.col_limit == nullptr) return vocab;
  return std::clamp<int64_t>(job.col_limit[row], 0, vocab);
}

// Per-row CE label (-1: none), or kIgnored for ignore_index rows (and rows whose column limit is <= 0).
// Without `has_ce` the labels only mark ignored rows. A label outside [0, vocab) (outside [0, limit) with a
// column limit) sets kFlagLabel in `flags` (the row gets NaN, the op raises).
std::vector<int64_t> row_labels(const RowJob& job, const std::optional<at::Tensor>& labels, int64_t rows,
                                int64_t ignore_index, int64_t vocab, bool has_ce, std::vector<int>& flags) {
  std::vector<int64_t> out(rows, -1);
  flags.assign(rows, 0);
  if (job.col_limit != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      if (job.col_limit[i] <= 0) out[i] = kIgnored;
    }
  }
  if (!labels.has_value()) return out;
  const at::Tensor& y = *labels;
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kLong && y.is_contiguous() && y.numel() == rows,
              "caad cpp backend: labels must be a contiguous int64 CPU tensor of ", rows, " elements");
  const int64_t* p = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    if (p[i] == ignore_index || out[i] == kIgnored) {
      out[i] = kIgnored;
    } else if (has_ce) {
      if (p[i] >= 0 && p[i] < row_columns(job, i, vocab)) {
        out[i] = p[i];
      } else {
        flags[i] = kFlagLabel;
      }
    }
  }
  return out;
}

// Column segments per row: 1 when there are enough rows to keep every thread busy.
int64_t segments_per_row(int64_t rows, int64_t vocab) {
  const int64_t threads = std::max(1, omp_get_max_threads());
  if (rows >= threads) return 1;
  const int64_t want = (threads + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, vocab / kMinSegmentColumns));
}

inline int64_t seg_begin(int64_t seg, int64_t segs, int64_t vocab) { return vocab * seg / segs; }

int64_t dynamic_chunk(int64_t units) {
  const int64_t threads = std::max(1, omp_get_max_threads());
  return std::max<int64_t>(1, units / (threads * 16));
}

float read_scalar(const Src& src, int64_t row, int64_t col) {
  const void* p = src.at(row, col);
  switch (src.dt) {
    case DType::kF32:
      return *static_cast<const float*>(p);
    case DType::kBF16:
      return static_cast<float>(*static_cast<const c10::BFloat16*>(p));
    default:
      return static_cast<float>(*static_cast<const c10::Half*>(p));
  }
}

struct ForwardOut {
  float* kd;
  float* ce;
  float* stats;
  int32_t* flags;
};

// Final per-row values from the merged state (and the mixture's sums). A flagged row gets NaN everywhere.
void finalize_row(const RowJob& job, int64_t row, int64_t label, float zmax, const Partial& st, float kl_pm,
                  float kl_qm, int flags, const ForwardOut& out) {
  out.flags[row] = flags;
  float* s = out.stats + row * 5;
  if (flags != 0) {
    out.kd[row] = out.ce[row] = NAN;
    std::fill(s, s + 5, NAN);
    return;
  }
  const double log_sa = std::log(static_cast<double>(st.sa)), log_sb = std::log(static_cast<double>(st.sb));
  const double inv_t = job.inv_temperature;
  double kd = 0.0, kl_aux = 0.0;
  switch (job.divergence) {
    case Divergence::kForward:
      kd = static_cast<double>(st.w) / st.sa - log_sa + log_sb;
      break;
    case Divergence::kReverse:
      kd = static_cast<double>(st.w) / st.sb - log_sb + log_sa;
      kl_aux = kd;
      break;
    default:
      kd = static_cast<double>(job.beta) * kl_pm + (1.0 - static_cast<double>(job.beta)) * kl_qm;
      kl_aux = kl_qm;
      break;
  }
  const double log_ss = std::log(static_cast<double>(st.ss));
  s[0] = static_cast<float>(st.ma + log_sa);
  s[1] = static_cast<float>(st.ms * inv_t + log_sb);
  s[2] = static_cast<float>(st.ms + log_ss);
  s[3] = static_cast<float>(kl_aux);
  s[4] = job.cutoff ? zmax : 0.f;
  out.kd[row] = static_cast<float>(kd);
  if (label >= 0) {
    // (max - s_y) + log S keeps the precision of large logits (and s_y = max in the limit of +inf)
    const float s_y = transform_scalar(read_scalar(job.student, row, label), job.student_scale, job.student_cap);
    out.ce[row] = static_cast<float>((static_cast<double>(st.ms) - s_y) + log_ss);
  } else {
    out.ce[row] = 0.f;
  }
}

void zero_row(int64_t row, const ForwardOut& out) {
  out.kd[row] = 0.f;
  out.ce[row] = 0.f;
  out.flags[row] = 0;
  std::fill(out.stats + row * 5, out.stats + row * 5 + 5, 0.f);
}

// Where the fused pass writes the gradient (absent for the forward alone). Rows are `row_stride` bytes apart
// (the fused-linear op pads them), of which the first `row_bytes` are the row's V entries.
struct GradOut {
  const float* coef_kd;
  const float* coef_ce;  // nullptr without labels
  char* base;
  size_t row_bytes;
  size_t row_stride;
};

// The gradient sweep's inputs for a row from its merged forward state (finalize_row has run). A flagged row
// gets NaN offsets, hence a NaN gradient wherever its coefficients are nonzero.
RowStats fused_row_stats(const RowJob& job, int64_t row, int64_t label, float zmax, const Partial& st,
                         const ForwardOut& out, const GradOut& g) {
  const bool ignored = label == kIgnored;
  const float bad = out.flags[row] != 0 ? NAN : 0.f;
  return RowStats{st.ma,
                  std::log(st.sa) + bad,
                  st.ms,
                  std::log(st.sb) + bad,
                  std::log(st.ss) + bad,
                  out.stats[row * 5 + 3],
                  zmax + job.log_plausibility,
                  ignored ? 0.f : g.coef_kd[row],
                  ignored || g.coef_ce == nullptr ? 0.f : g.coef_ce[row],
                  ignored ? -1 : label};
}

void check_f32_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == rows * cols,
              "caad cpp backend: ", name, " must be a contiguous float32 CPU tensor of ", rows, " x ", cols,
              " elements");
}

void check_grad(const at::Tensor& grad, const at::Tensor& student, int64_t rows, int64_t vocab) {
  TORCH_CHECK(grad.device().is_cpu() && grad.dim() == 2 && grad.size(0) == rows && grad.size(1) == vocab &&
                  (grad.stride(1) == 1 || vocab <= 1) && (grad.stride(0) >= vocab || rows <= 1) &&
                  grad.scalar_type() == student.scalar_type(),
              "caad cpp backend: grad must be a [", rows, ", ", vocab,
              "] CPU tensor with unit column stride in the student's dtype");
}

GradOut make_grad_out(const at::Tensor& grad, const float* coef_kd, const float* coef_ce, int64_t vocab, DType dt) {
  const size_t size = dtype_size(dt);
  const int64_t stride = grad.size(0) > 1 ? grad.stride(0) : vocab;
  return GradOut{coef_kd, coef_ce, static_cast<char*>(grad.data_ptr()), static_cast<size_t>(vocab) * size,
                 static_cast<size_t>(stride) * size};
}

// The gradient of columns [c0, c1) of a row that reads columns [0, ncols): the kernel below ncols, zeros from
// there on (ncols = vocab without a column limit: the kernel alone).
inline void backward_columns(const Kernels& K, const RowJob& job, int64_t row, int64_t c0, int64_t c1, int64_t ncols,
                             const RowStats& rs, char* grad_row) {
  const int64_t mid = std::clamp(ncols, c0, c1);
  if (mid > c0) K.backward(job, row, c0, mid, rs, grad_row);
  if (c1 > mid) {
    const size_t size = dtype_size(job.grad_dt);
    std::memset(grad_row + mid * size, 0, static_cast<size_t>(c1 - mid) * size);
  }
}

// The teacher's maximum after its transform (monotone, so transform of the raw maximum).
inline float transformed_zmax(const RowJob& job, float raw) {
  return transform_scalar(raw, job.teacher_scale, job.teacher_cap);
}

// The forward sweeps of every row; with `grad`, each row's gradient sweep follows its forward
// sweeps. With one unit per row that happens inside the same loop iteration (the row is still in
// cache; the row is read in full before its first gradient tile is written, so grad may alias the
// student). With split rows the gradient units run only after every row's segments have been merged
// (the loops are separated by the implicit barrier of `omp parallel for`). Ignored rows are never read.
void forward_impl(const RowJob& job, int64_t rows, int64_t vocab, const std::vector<int64_t>& label,
                  const std::vector<int>& label_flags, const ForwardOut& out, const GradOut* grad) {
  const Kernels& K = *g_kernels;
  const bool mixture = job.divergence == Divergence::kMixture;
  const int64_t segs = segments_per_row(rows, vocab);

  if (segs == 1) {
#pragma omp parallel for schedule(dynamic, dynamic_chunk(rows))
    for (int64_t row = 0; row < rows; ++row) {
      if (label[row] == kIgnored) {
        zero_row(row, out);
        if (grad != nullptr) std::memset(grad->base + row * grad->row_stride, 0, grad->row_bytes);
        continue;
      }
      const int64_t ncols = row_columns(job, row, vocab);
      const float zmax = job.cutoff ? transformed_zmax(job, K.zmax(job, row, 0, ncols)) : 0.f;
      const float zthr = zmax + job.log_plausibility;
      const Partial st = K.main(job, row, 0, ncols, zthr);
      float pm = 0.f, qm = 0.f;
      if (mixture) K.mixture(job, row, 0, ncols, zthr, st, &pm, &qm);
      finalize_row(job, row, label[row], zmax, st, pm, qm, st.flags | label_flags[row], out);
      if (grad != nullptr) {
        const RowStats rs = fused_row_stats(job, row, label[row], zmax, st, out, *grad);
        backward_columns(K, job, row, 0, vocab, ncols, rs, grad->base + row * grad->row_stride);
      }
    }
    return;
  }

  // Few rows: every sweep is split over (row, segment) units, then the partials are merged per row. With a
  // column limit a segment reads only its columns below the row's limit (possibly none: an empty state).
  const int64_t units = rows * segs;
  auto seg_lo = [&](int64_t row, int64_t seg) {
    return std::min(seg_begin(seg, segs, vocab), row_columns(job, row, vocab));
  };
  auto seg_hi = [&](int64_t row, int64_t seg) { return seg_lo(row, seg + 1); };
  std::vector<float> zmax(rows, 0.f), part_zmax(units, -INFINITY);
  if (job.cutoff) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t row = u / segs, seg = u % segs;
      if (label[row] != kIgnored) {
        part_zmax[u] = K.zmax(job, row, seg_lo(row, seg), seg_hi(row, seg));
      }
    }
    for (int64_t row = 0; row < rows; ++row) {
      zmax[row] = transformed_zmax(
          job, *std::max_element(part_zmax.begin() + row * segs, part_zmax.begin() + (row + 1) * segs));
    }
  }
  std::vector<Partial> part(units);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t row = u / segs, seg = u % segs;
    if (label[row] != kIgnored) {
      part[u] = K.main(job, row, seg_lo(row, seg), seg_hi(row, seg), zmax[row] + job.log_plausibility);
    }
  }
  std::vector<Partial> state(rows);
  for (int64_t u = 0; u < units; ++u) merge_partial(state[u / segs], part[u], job.inv_temperature, job.divergence);
  std::vector<float> pm(units, 0.f), qm(units, 0.f);
  if (mixture) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t row = u / segs, seg = u % segs;
      if (label[row] != kIgnored) {
        K.mixture(job, row, seg_lo(row, seg), seg_hi(row, seg), zmax[row] + job.log_plausibility, state[row],
                  &pm[u], &qm[u]);
      }
    }
  }
  for (int64_t row = 0; row < rows; ++row) {
    if (label[row] == kIgnored) {
      zero_row(row, out);
      continue;
    }
    float row_pm = 0.f, row_qm = 0.f;
    for (int64_t seg = 0; seg < segs; ++seg) {
      row_pm += pm[row * segs + seg];
      row_qm += qm[row * segs + seg];
    }
    finalize_row(job, row, label[row], zmax[row], state[row], row_pm, row_qm, state[row].flags | label_flags[row],
                 out);
  }
  if (grad == nullptr) return;
  // every segment of every row has been read and merged: now the segments may write their gradients
  std::vector<RowStats> row_stats(rows);
  for (int64_t row = 0; row < rows; ++row) {
    row_stats[row] = fused_row_stats(job, row, label[row], zmax[row], state[row], out, *grad);
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t row = u / segs, seg = u % segs;
    backward_columns(K, job, row, seg_begin(seg, segs, vocab), seg_begin(seg + 1, segs, vocab),
                     row_columns(job, row, vocab), row_stats[row], grad->base + row * grad->row_stride);
  }
}

// ---------------------------------------------------------------------------------------------
// entry points
//
// `scalars` = [alpha, inv_temperature, beta, log_plausibility, student_scale, teacher_scale, student_cap,
// teacher_cap]; `has_ce`: labels hold CE classes (else they only mark ignored rows).

std::vector<at::Tensor> forward_outputs(int64_t rows) {
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  return {at::empty({rows}, opts), at::empty({rows}, opts), at::empty({rows, 5}, opts),
          at::empty({rows}, at::TensorOptions().dtype(at::kInt).device(at::kCPU))};
}

ForwardOut forward_out(std::vector<at::Tensor>& t) {
  return ForwardOut{t[0].data_ptr<float>(), t[1].data_ptr<float>(), t[2].data_ptr<float>(), t[3].data_ptr<int32_t>()};
}

std::vector<at::Tensor> forward(const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& negative, const std::optional<at::Tensor>& labels,
                                const std::optional<at::Tensor>& alpha_rows, const std::optional<at::Tensor>& col_limit,
                                const std::vector<double>& scalars, bool cutoff, bool has_ce, int64_t ignore_index,
                                int64_t vocab) {
  const RowJob job = make_job(student, teacher, negative, alpha_rows, col_limit, scalars, cutoff, vocab);
  const int64_t rows = student.size(0) * student.size(1);
  std::vector<at::Tensor> result = forward_outputs(rows);
  if (rows == 0) return result;
  std::vector<int> label_flags;
  const std::vector<int64_t> label = row_labels(job, labels, rows, ignore_index, vocab, has_ce, label_flags);
  forward_impl(job, rows, vocab, label, label_flags, forward_out(result), nullptr);
  return result;
}

// forward and backward in one pass for coefficients known in advance; returns what forward returns
// and writes grad (which may alias the student).
std::vector<at::Tensor> loss_and_grad(const at::Tensor& student, const at::Tensor& teacher,
                                      const std::optional<at::Tensor>& negative,
                                      const std::optional<at::Tensor>& labels,
                                      const std::optional<at::Tensor>& alpha_rows,
                                      const std::optional<at::Tensor>& col_limit, const at::Tensor& coef_kd,
                                      const at::Tensor& coef_ce, const std::vector<double>& scalars, bool cutoff,
                                      bool has_ce, int64_t ignore_index, int64_t vocab, at::Tensor& grad) {
  const RowJob job = make_job(student, teacher, negative, alpha_rows, col_limit, scalars, cutoff, vocab);
  const int64_t rows = student.size(0) * student.size(1);
  check_f32_rows(coef_kd, "coef_kd", rows, 1);
  check_f32_rows(coef_ce, "coef_ce", rows, 1);
  check_grad(grad, student, rows, vocab);
  std::vector<at::Tensor> result = forward_outputs(rows);
  if (rows == 0) return result;
  std::vector<int> label_flags;
  const std::vector<int64_t> label = row_labels(job, labels, rows, ignore_index, vocab, has_ce, label_flags);
  const GradOut g = make_grad_out(grad, coef_kd.data_ptr<float>(), has_ce ? coef_ce.data_ptr<float>() : nullptr,
                                  vocab, job.grad_dt);
  forward_impl(job, rows, vocab, label, label_flags, forward_out(result), &g);
  return result;
}

void backward(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& negative,
              const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& alpha_rows,
              const std::optional<at::Tensor>& col_limit, const at::Tensor& stats, const at::Tensor& coef_kd,
              const at::Tensor& coef_ce, const std::vector<double>& scalars, bool cutoff, bool has_ce,
              int64_t ignore_index, int64_t vocab, at::Tensor& grad) {
  const RowJob job = make_job(student, teacher, negative, alpha_rows, col_limit, scalars, cutoff, vocab);
  const int64_t rows = student.size(0) * student.size(1);
  check_f32_rows(stats, "stats", rows, 5);
  check_f32_rows(coef_kd, "coef_kd", rows, 1);
  check_f32_rows(coef_ce, "coef_ce", rows, 1);
  check_grad(grad, student, rows, vocab);
  if (rows == 0) return;
  std::vector<int> label_flags;
  const std::vector<int64_t> label = row_labels(job, labels, rows, ignore_index, vocab, has_ce, label_flags);
  const float* st = stats.data_ptr<float>();
  const float* ckd = coef_kd.data_ptr<float>();
  const float* cce = coef_ce.data_ptr<float>();
  const GradOut g = make_grad_out(grad, ckd, cce, vocab, job.grad_dt);
  const Kernels& K = *g_kernels;
  const int64_t segs = segments_per_row(rows, vocab), units = rows * segs;

#pragma omp parallel for schedule(dynamic, dynamic_chunk(units))
  for (int64_t u = 0; u < units; ++u) {
    const int64_t row = u / segs, seg = u % segs;
    const float* s = st + row * 5;
    const bool ignored = label[row] == kIgnored;
    RowStats rs{s[0], 0.f, 0.f, s[1], s[2], s[3], s[4] + job.log_plausibility, ignored ? 0.f : ckd[row],
                ignored || !has_ce ? 0.f : cce[row], ignored ? -1 : label[row]};
    backward_columns(K, job, row, seg_begin(seg, segs, vocab), seg_begin(seg + 1, segs, vocab),
                     row_columns(job, row, vocab), rs, g.base + row * g.row_stride);
  }
}

std::string isa() { return g_kernels->name; }

// Testing hook: force the "generic" kernels (or back to the best available with "auto").
void set_isa(const std::string& name) {
  if (name == "generic") {
    g_kernels = &kGeneric;
  } else if (name == "auto") {
    g_kernels = best_kernels();
  } else {
    TORCH_CHECK(false, "caad cpp backend: unknown ISA ", name, " (use 'generic' or 'auto')");
  }
}

}  // namespace caad

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "caad_kernels C++ (OpenMP) CPU row kernels of the contrastive KD loss";
  m.def("forward", &caad::forward, py::call_guard<py::gil_scoped_release>(),
        "forward(student, teacher, negative, labels, alpha_rows, col_limit, scalars, cutoff, has_ce, ignore_index, "
        "vocab) -> [kd, ce, stats, flags]; scalars = [alpha, inv_temperature, beta, log_plausibility, student_scale, "
        "teacher_scale, student_cap, teacher_cap]",
        py::arg("student"), py::arg("teacher"), py::arg("negative"), py::arg("labels"), py::arg("alpha_rows"),
        py::arg("col_limit"), py::arg("scalars"), py::arg("cutoff"), py::arg("has_ce"), py::arg("ignore_index"), py::arg("vocab"));
  m.def("backward", &caad::backward, py::call_guard<py::gil_scoped_release>(),
        "backward(student, teacher, negative, labels, alpha_rows, col_limit, stats, coef_kd, coef_ce, scalars, cutoff, "
        "has_ce, ignore_index, vocab, grad) -> None (writes grad)",
        py::arg("student"), py::arg("teacher"), py::arg("negative"), py::arg("labels"), py::arg("alpha_rows"),
        py::arg("col_limit"), py::arg("stats"), py::arg("coef_kd"), py::arg("coef_ce"), py::arg("scalars"), py::arg("cutoff"),
        py::arg("has_ce"), py::arg("ignore_index"), py::arg("vocab"), py::arg("grad"));
  m.def("loss_and_grad", &caad::loss_and_grad, py::call_guard<py::gil_scoped_release>(),
        "loss_and_grad(student, teacher, negative, labels, alpha_rows, col_limit, coef_kd, coef_ce, scalars, cutoff, "
        "has_ce, ignore_index, vocab, grad) -> [kd, ce, stats, flags] (and writes grad, which may alias the student)",
        py::arg("student"), py::arg("teacher"), py::arg("negative"), py::arg("labels"), py::arg("alpha_rows"),
        py::arg("col_limit"), py::arg("coef_kd"), py::arg("coef_ce"), py::arg("scalars"), py::arg("cutoff"), py::arg("has_ce"),
        py::arg("ignore_index"), py::arg("vocab"), py::arg("grad"));
  m.def("isa", &caad::isa, "name of the kernel set in use: 'avx2' or 'generic'");
  m.def("set_isa", &caad::set_isa, "testing hook: 'generic' forces the baseline kernels, 'auto' restores");
}
