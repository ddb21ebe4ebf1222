// memcli._native: reduce a block of logits rows to per-token statistics.
//
// Verification reads one logits row (one vocabulary-sized float vector) per answer token and only needs a
// handful of numbers from it: the target's log-probability, the argmax, and how far the target is from the
// best competitor. score_rows() computes all of them in a single sweep over each row, rows in parallel,
// without copying the logits.
//
// Row semantics (memcli/scoring.py:score_numpy is the reference implementation and must agree):
//   lse          = log(sum_j exp(x_j))                     (computed stably, shifted by the row max)
//   target_logit = x[target]
//   logprob      = target_logit - lse,  prob = exp(logprob)
//   argmax       = index of the largest entry, lowest index on ties
//   best_other   = max over j != target of x_j              (-inf when the row has a single entry)
//   margin       = target_logit - best_other                (0 when the target ties the best competitor)
//   rank         = #{j : x_j > target_logit}                (0 means argmax or tied for it)
// -inf entries are allowed (masked vocabulary); they contribute exp(-inf) = 0.
// A row is *invalid* when it contains a NaN or +inf, or when every entry is -inf: there is no probability
// distribution to speak of. For such rows logprob, prob, best_other and margin are NaN and argmax and rank
// are -1 (target_logit still holds the raw value), so any "is this token recalled?" test fails on them.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace nb = nanobind;

namespace {

using i64 = std::int64_t;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A row is swept in blocks of kBlock entries (4 KiB): the block max is found first, then the exp-sum runs over
// the same block while it is still in L1, so each row is read from memory only once.
constexpr i64 kBlock = 1024;

#if defined(__GNUC__)
#define MEMCLI_INLINE inline __attribute__((always_inline))
#else
#define MEMCLI_INLINE inline
#endif

// With GCC and Clang the inner loops run on explicit SIMD vectors (GNU vector extensions): 16 bytes in the
// portable build (SSE2 / NEON), 32 bytes in an AVX2 + FMA build of the same code that x86-64 CPUs supporting it
// get at run time. Other compilers (or -DMEMCLI_NO_VECTORS) take the scalar loops, which also handle the tail
// of every block.
#if defined(__GNUC__) && !defined(MEMCLI_NO_VECTORS)
#define MEMCLI_VECTORS 1
template <int Bytes>
struct Simd {
    typedef float F __attribute__((vector_size(Bytes)));
    typedef std::int32_t I __attribute__((vector_size(Bytes)));
    typedef std::uint32_t U __attribute__((vector_size(Bytes)));
    static constexpr int kWidth = Bytes / 4;
};
using PortableSimd = Simd<16>;
// Helpers returning 32-byte vectors are always inlined into the AVX2 function, so GCC's warning about the
// vector-return ABI without AVX does not apply to them.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
struct PortableSimd {};
#endif
#if defined(MEMCLI_VECTORS) && defined(__x86_64__)
#define MEMCLI_AVX2_DISPATCH 1
#endif

// A float constant in every lane of F (F = float or a vector of floats).
template <typename F>
MEMCLI_INLINE F splat(float c) {
    return F{} + c;
}

// exp(x) for x <= 0, lane-wise for F = float or a float vector (U: the matching unsigned integer type).
// Relative error below 3e-7 (a few float32 ulps) on [-87, 0]. Below -87 the result is clamped to about 1.6e-38
// rather than 0 (also for -inf): every sum this feeds already holds a term equal to 1 (the row max), so that is
// far below float resolution. A NaN stays NaN, which is how rows holding one are detected.
// Written without -ffast-math tricks, so the compiler keeps the operation order.
template <typename F, typename U>
MEMCLI_INLINE F exp_nonpositive(const F& arg) {
    const F lo = splat<F>(-87.0f);
    const F x = arg < lo ? lo : arg;  // keeps NaN
    // Round x / ln2 to the nearest integer k: adding 1.5 * 2^23 pushes the fraction out of the mantissa, and
    // the low mantissa bits of z then hold k itself.
    const F round = splat<F>(12582912.0f);
    const F z = x * splat<F>(1.44269502f) + round;
    const F k = z - round;  // k in [-126, 0]
    // r = x - k ln2 in two steps (Cody-Waite): ln2 = hi + lo, and k * hi is exact.
    F r = x - k * splat<F>(0.693145751953125f);
    r = r - k * splat<F>(1.428606765330187e-06f);  // |r| <= ln2 / 2
    // exp(r) by its Taylor series to degree 6; the truncation error is below 1.2e-7 for |r| <= ln2 / 2.
    F p = splat<F>(1.0f / 720.0f);
    p = p * r + splat<F>(1.0f / 120.0f);
    p = p * r + splat<F>(1.0f / 24.0f);
    p = p * r + splat<F>(1.0f / 6.0f);
    p = p * r + splat<F>(0.5f);
    p = p * r + splat<F>(1.0f);
    p = p * r + splat<F>(1.0f);
    // 2^k as a float: exponent field k + 127, taken from the low bits of z (k + 127 >= 1: a normal number).
    U bits;
    std::memcpy(&bits, &z, sizeof bits);
    bits = (bits << 23) + (127u << 23);
    F scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// Running state of one row's sweep over its non-target entries. The target entry is accounted for up front,
// so every loop simply skips it and best_other falls out as the plain max of what the loops see.
struct Sweep {
    float target;                     // x[target]
    float shift;                      // max(target, entries seen so far): the exp-sum is taken relative to it
    double sum;                       // sum of exp(x_j - shift) over the target and entries seen so far;
                                      // NaN once a NaN entry was seen
    float other_max = -kInf;          // max over non-target entries seen so far
    const float* other_max_block = nullptr;  // first block that reached other_max (for the argmax index)
    i64 other_max_block_len = 0;
    i64 greater = 0;                  // entries strictly greater than the target
};

// Max of a block (ignoring NaN), plus (added to the sweep) the count of entries above the target.
template <typename S>
MEMCLI_INLINE float scan_block(const float* x, i64 len, Sweep& s) {
    const float t = s.target;
    float m = -kInf;
    i64 greater = 0;
    i64 i = 0;
#ifdef MEMCLI_VECTORS
    using F = typename S::F;
    using I = typename S::I;
    constexpr int W = S::kWidth;
    // Two independent vectors per step; comparisons give -1 in true lanes, hence the subtraction.
    const F tv = splat<F>(t);
    F m0 = splat<F>(-kInf), m1 = m0;
    I gt = {};
    for (; i + 2 * W <= len; i += 2 * W) {
        F v0, v1;
        std::memcpy(&v0, x + i, sizeof v0);
        std::memcpy(&v1, x + i + W, sizeof v1);
        m0 = v0 > m0 ? v0 : m0;
        m1 = v1 > m1 ? v1 : m1;
        gt -= (v0 > tv) + (v1 > tv);
    }
    m0 = m1 > m0 ? m1 : m0;
    for (int j = 0; j < W; ++j) {
        m = m0[j] > m ? m0[j] : m;
        greater += gt[j];
    }
#endif
    for (; i < len; ++i) {
        const float v = x[i];
        m = v > m ? v : m;
        greater += v > t;
    }
    s.greater += greater;
    return m;
}

// sum_j exp(x_j - shift) over a block, every x_j <= shift. Each float lane accumulates at most 128 terms; the
// total across blocks is kept in double.
template <typename S>
MEMCLI_INLINE double exp_sum_block(const float* x, i64 len, float shift) {
    double total = 0.0;
    i64 i = 0;
#ifdef MEMCLI_VECTORS
    using F = typename S::F;
    constexpr int W = S::kWidth;
    const F sv = splat<F>(shift);
    F acc0 = {}, acc1 = {};
    for (; i + 2 * W <= len; i += 2 * W) {
        F v0, v1;
        std::memcpy(&v0, x + i, sizeof v0);
        std::memcpy(&v1, x + i + W, sizeof v1);
        acc0 += exp_nonpositive<F, typename S::U>(v0 - sv);
        acc1 += exp_nonpositive<F, typename S::U>(v1 - sv);
    }
    acc0 += acc1;
    for (int j = 0; j < W; ++j) total += acc0[j];
#endif
    float tail = 0.0f;
    for (; i < len; ++i) tail += exp_nonpositive<float, std::uint32_t>(x[i] - shift);
    return total + tail;
}

// Sweep the contiguous entries x[0, len) (none of them the target), block by block.
template <typename S>
MEMCLI_INLINE void sweep_range(const float* x, i64 len, Sweep& s) {
    for (i64 start = 0; start < len; start += kBlock) {
        const float* block = x + start;
        const i64 n = std::min(kBlock, len - start);
        const float block_max = scan_block<S>(block, n, s);
        if (block_max > s.other_max) {  // strict: the earliest block keeps ties, for the lowest-index argmax
            s.other_max = block_max;
            s.other_max_block = block;
            s.other_max_block_len = n;
        }
        if (block_max > s.shift) {  // rescale the running sum to the new maximum (online log-sum-exp)
            s.sum *= std::exp(static_cast<double>(s.shift) - static_cast<double>(block_max));
            s.shift = block_max;
        }
        if (s.shift > -kInf) {
            s.sum += exp_sum_block<S>(block, n, s.shift);
        } else if (std::any_of(block, block + n, [](float v) { return std::isnan(v); })) {
            s.sum = kNaN;  // nothing above -inf yet, so no exp-sum to carry the NaN (rare: masked blocks only)
        }
    }
}

// One sweep over a row: the entries before the target, then the entries after it.
template <typename S>
MEMCLI_INLINE Sweep sweep_row(const float* row, i64 vocab, i64 target) {
    Sweep s;
    s.target = row[target];
    s.shift = s.target;
    s.sum = s.target > -kInf ? 1.0 : 0.0;  // the target's own term, exp(target - shift)
    sweep_range<S>(row, target, s);
    sweep_range<S>(row + target + 1, vocab - target - 1, s);
    return s;
}

using SweepFn = Sweep (*)(const float* row, i64 vocab, i64 target);

Sweep sweep_row_portable(const float* row, i64 vocab, i64 target) {
    return sweep_row<PortableSimd>(row, vocab, target);
}

#ifdef MEMCLI_AVX2_DISPATCH
__attribute__((target("avx2,fma"))) Sweep sweep_row_avx2(const float* row, i64 vocab, i64 target) {
    return sweep_row<Simd<32>>(row, vocab, target);
}
#endif

// The fastest sweep this CPU can run. MEMCLI_NATIVE_SIMD=portable forces the portable build (for tests).
SweepFn pick_sweep() {
#ifdef MEMCLI_AVX2_DISPATCH
    const char* force = std::getenv("MEMCLI_NATIVE_SIMD");
    const bool portable = force != nullptr && std::strcmp(force, "portable") == 0;
    if (!portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return sweep_row_avx2;
#endif
    return sweep_row_portable;
}

// Name of the code path pick_sweep() chooses.
const char* kernel_isa() {
#ifdef MEMCLI_AVX2_DISPATCH
    if (pick_sweep() == sweep_row_avx2) return "avx2";
#endif
    return "portable";
}

struct RowResult {
    double logprob, prob, target_logit, best_other, margin;
    i64 argmax, rank;
};

// Turn a finished sweep into the row's statistics.
RowResult finish_row(const float* row, i64 vocab, i64 target, const Sweep& s) {
    RowResult out;
    out.target_logit = s.target;
    // shift is the row max (ignoring NaN): -inf for an all-masked row, +inf (or NaN, for a NaN target) for
    // rows the distribution is undefined for; any NaN entry made the sum NaN.
    const bool valid = std::isfinite(s.shift) && !std::isnan(s.sum);
    if (!valid) {
        out.logprob = out.prob = out.best_other = out.margin = kNaN;
        out.argmax = out.rank = -1;
        return out;
    }

    // logprob = target - lse with lse = shift + log(sum); grouped so that huge logits (1e30) keep the log(sum)
    // part, which would vanish next to lse itself.
    out.logprob = (static_cast<double>(s.target) - static_cast<double>(s.shift)) - std::log(s.sum);
    out.prob = std::exp(out.logprob);
    out.best_other = s.other_max;
    out.margin = static_cast<double>(s.target) - static_cast<double>(s.other_max);
    out.rank = s.greater;

    // Lowest index of a non-target entry equal to other_max (-1 if the target is the only entry).
    i64 first_other = -1;
    if (s.other_max_block != nullptr) {
        for (i64 i = 0; i < s.other_max_block_len; ++i) {
            if (s.other_max_block[i] == s.other_max) {
                first_other = (s.other_max_block - row) + i;
                break;
            }
        }
    } else if (vocab > 1) {
        first_other = target == 0 ? 1 : 0;  // every other entry is -inf: the first of them
    }
    if (first_other < 0 || s.target > s.other_max) {
        out.argmax = target;
    } else if (s.target < s.other_max) {
        out.argmax = first_other;
    } else {
        out.argmax = std::min(target, first_other);
    }
    return out;
}

struct Outputs {
    double* logprob;
    double* prob;
    i64* argmax;
    double* target_logit;
    double* best_other;
    double* margin;
    i64* rank;
};

// row_fn(r) for every row of a [rows, vocab] block, on up to n_threads threads (the calling one included). Rows are
// handed out dynamically in small batches of at least ~16k entries of work; no thread is started that would get
// less than ~64k entries.
template <typename RowFn>
void for_each_row(i64 rows, i64 vocab, int n_threads, const RowFn& row_fn) {
    const i64 batch = std::max<i64>(1, (i64{1} << 14) / std::max<i64>(vocab, 1));
    std::atomic<i64> next{0};
    auto worker = [&] {
        for (;;) {
            const i64 begin = next.fetch_add(batch);
            if (begin >= rows) return;
            const i64 end = std::min(rows, begin + batch);
            for (i64 r = begin; r < end; ++r) row_fn(r);
        }
    };
    const i64 useful = std::max<i64>(1, (rows * vocab) >> 16);
    const int threads = static_cast<int>(std::min<i64>(n_threads, useful));
    std::vector<std::thread> pool;
    try {
        for (int k = 1; k < threads; ++k) pool.emplace_back(worker);
    } catch (const std::system_error&) {
        // Could not start more threads: the ones running (and this one) share the remaining rows.
    }
    worker();
    for (auto& th : pool) th.join();
}

void score_block(SweepFn sweep, const float* logits, const i64* targets, i64 rows, i64 vocab, int n_threads,
                 const Outputs& out) {
    for_each_row(rows, vocab, n_threads, [&](i64 r) {
        const float* row = logits + r * vocab;
        const RowResult res = finish_row(row, vocab, targets[r], sweep(row, vocab, targets[r]));
        out.logprob[r] = res.logprob;
        out.prob[r] = res.prob;
        out.argmax[r] = res.argmax;
        out.target_logit[r] = res.target_logit;
        out.best_other[r] = res.best_other;
        out.margin[r] = res.margin;
        out.rank[r] = res.rank;
    });
}

template <typename T>
nb::object numpy_vector(std::unique_ptr<T[]> data, size_t n) {
    T* ptr = data.release();
    nb::capsule owner(ptr, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    return nb::ndarray<nb::numpy, T, nb::ndim<1>>(ptr, {n}, owner).cast();
}

using LogitsArray = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using TargetsArray = nb::ndarray<const i64, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

nb::dict score_rows(const LogitsArray& logits, const TargetsArray& targets, int n_threads) {
    const i64 rows = static_cast<i64>(logits.shape(0));
    const i64 vocab = static_cast<i64>(logits.shape(1));
    if (static_cast<i64>(targets.shape(0)) != rows) {
        throw nb::value_error(("score_rows: targets has " + std::to_string(targets.shape(0)) +
                               " entries but logits has " + std::to_string(rows) + " rows").c_str());
    }
    const float* x = logits.data();
    const i64* t = targets.data();
    for (i64 r = 0; r < rows; ++r) {
        if (t[r] < 0 || t[r] >= vocab) {
            throw nb::value_error(("score_rows: target " + std::to_string(t[r]) + " at row " +
                                   std::to_string(r) + " is outside the vocabulary [0, " +
                                   std::to_string(vocab) + ")").c_str());
        }
    }
    if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

    const SweepFn sweep = pick_sweep();

    const size_t n = static_cast<size_t>(rows);
    std::unique_ptr<double[]> logprob(new double[n]), prob(new double[n]), target_logit(new double[n]),
        best_other(new double[n]), margin(new double[n]);
    std::unique_ptr<i64[]> argmax(new i64[n]), rank(new i64[n]);
    {
        nb::gil_scoped_release no_gil;
        score_block(sweep, x, t, rows, vocab, n_threads,
                    Outputs{logprob.get(), prob.get(), argmax.get(), target_logit.get(), best_other.get(),
                            margin.get(), rank.get()});
    }

    nb::dict result;
    result["logprob"] = numpy_vector(std::move(logprob), n);
    result["prob"] = numpy_vector(std::move(prob), n);
    result["argmax"] = numpy_vector(std::move(argmax), n);
    result["target_logit"] = numpy_vector(std::move(target_logit), n);
    result["best_other"] = numpy_vector(std::move(best_other), n);
    result["margin"] = numpy_vector(std::move(margin), n);
    result["rank"] = numpy_vector(std::move(rank), n);
    return result;
}


// --- KL(P || Q) between two blocks of logits rows ---------------------------------------------------------------
//
// Row semantics (memcli/scoring.py:kl_numpy is the reference and must agree), P = softmax(p), Q = softmax(q):
//   kl = sum_j P_j (log P_j - log Q_j)
// computed in one sweep after the two row maxima mp, mq are known, with sp = sum_j exp(p_j - mp),
// sq = sum_j exp(q_j - mq) and s = sum_j exp(p_j - mp) (p_j - q_j) over the entries with p_j > -inf:
//   kl = s / sp - (mp - mq) - log(sp) + log(sq)
// (log P_j - log Q_j = (p_j - q_j) - (mp - mq) - log sp + log sq, and sum_j P_j = 1). Identical rows give exactly 0.
// An entry masked in p (-inf) contributes nothing; one masked in q but not in p makes kl +inf. A row of either
// block holding a NaN or +inf, or only -inf entries, gives NaN (no distribution to compare).
double kl_row(const float* p, const float* q, i64 vocab) {
    float mp = -kInf, mq = -kInf;
    bool nan = false;
    for (i64 i = 0; i < vocab; ++i) {
        const float a = p[i], b = q[i];
        nan |= std::isnan(a) || std::isnan(b);
        mp = a > mp ? a : mp;
        mq = b > mq ? b : mq;
    }
    if (nan || !std::isfinite(mp) || !std::isfinite(mq)) return kNaN;
    double sp = 0.0, sq = 0.0, s = 0.0;
    for (i64 start = 0; start < vocab; start += kBlock) {  // float partial sums per block, double across blocks
        const i64 end = std::min(vocab, start + kBlock);
        float bp = 0.0f, bq = 0.0f, bs = 0.0f;
        for (i64 i = start; i < end; ++i) {
            const float a = p[i], b = q[i];
            const float ea = exp_nonpositive<float, std::uint32_t>(a - mp);
            bp += ea;
            bq += exp_nonpositive<float, std::uint32_t>(b - mq);
            if (a > -kInf) bs += ea * (a - b);
        }
        sp += bp;
        sq += bq;
        s += bs;
    }
    return s / sp - (static_cast<double>(mp) - static_cast<double>(mq)) - std::log(sp) + std::log(sq);
}

nb::object kl_rows(const LogitsArray& p, const LogitsArray& q, int n_threads) {
    const i64 rows = static_cast<i64>(p.shape(0));
    const i64 vocab = static_cast<i64>(p.shape(1));
    if (static_cast<i64>(q.shape(0)) != rows || static_cast<i64>(q.shape(1)) != vocab) {
        throw nb::value_error(("kl_rows: p has shape [" + std::to_string(rows) + ", " + std::to_string(vocab) +
                               "] but q has [" + std::to_string(q.shape(0)) + ", " + std::to_string(q.shape(1)) +
                               "]").c_str());
    }
    if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const float* a = p.data();
    const float* b = q.data();
    const size_t n = static_cast<size_t>(rows);
    std::unique_ptr<double[]> out(new double[n]);
    {
        nb::gil_scoped_release no_gil;
        double* o = out.get();
        for_each_row(rows, vocab, n_threads, [&](i64 r) { o[r] = kl_row(a + r * vocab, b + r * vocab, vocab); });
    }
    return numpy_vector(std::move(out), n);
}

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "memcli native kernels: per-token statistics from blocks of logits rows.";
    m.def("score_rows", &score_rows, nb::arg("logits").noconvert(), nb::arg("targets").noconvert(),
          nb::arg("n_threads") = 0,
          "Reduce each row of `logits` (float32, C-contiguous, shape [n, V]; read in place) against its\n"
          "target id (`targets`: int64, C-contiguous, shape [n]) in one pass, rows in parallel on\n"
          "`n_threads` threads (<= 0: all hardware threads), without holding the GIL.\n\n"
          "Returns a dict of length-n numpy arrays: logprob, prob, target_logit, best_other, margin\n"
          "(float64) and argmax, rank (int64). argmax takes the lowest index on ties; rank counts entries\n"
          "strictly greater than the target logit. Rows holding NaN or +inf, or only -inf, give NaN floats\n"
          "and argmax = rank = -1. Raises ValueError for a target outside [0, V) or a length mismatch,\n"
          "TypeError for any other dtype, shape or layout (no implicit copies are made).");
    m.def("kl_rows", &kl_rows, nb::arg("p").noconvert(), nb::arg("q").noconvert(), nb::arg("n_threads") = 0,
          "KL(softmax(p) || softmax(q)) of each row pair of two float32, C-contiguous [n, V] blocks, in nats\n"
          "(float64, length n), rows in parallel without holding the GIL. Rows holding NaN or +inf, or only\n"
          "-inf, give NaN; an entry masked (-inf) in q but not in p gives +inf. Raises ValueError when the\n"
          "shapes differ, TypeError for any other dtype or layout (no implicit copies are made).");
    m.def("kernel_isa", &kernel_isa,
          "The code path score_rows uses on this CPU: 'avx2' (x86-64 with AVX2 + FMA) or 'portable'.\n"
          "Setting MEMCLI_NATIVE_SIMD=portable in the environment forces the portable one.");
}
