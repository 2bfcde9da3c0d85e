// The CPU kernels, written once over a vector type `Vec` that each instruction-set file defines
// before including this header inside its own anonymous namespace (so that every ISA gets its own
// copy with internal linkage, compiled for its target; see cpu_avx512.cpp). Standard headers are
// included by the ISA file before it switches the target on, never here.
//
// Vec provides: W (fp32 lanes), T (the register type), load/store (fp32), add/sub/mul,
// fma(a, b, c) = a * b + c, set1, zero, hsum, load/store of W bf16 or fp16 values converted
// from/to fp32 (round to nearest even), and inner(v): the log2(W) butterfly stages between the
// lanes of one vector.
//
// The Walsh-Hadamard transform of a row of N = 2**m values is m butterfly stages, stage b pairing
// elements i and i + 2**b: (a, c) -> (a + c, a - c). Stages commute, so any order gives H_N. With
// V = N / W vectors per row, the stages are grouped into passes over the row, each pass loading a
// few vectors into registers, doing several stages there and storing them back:
//   lo pass:  log2(W) lane stages (inner) + the stages between up to 4 consecutive vectors;
//   hi passes: the stages between vectors 4, 8, ... apart, three at a time (8 vectors at a stride).
// The first pass reads the input row (converting to fp32) and the last writes the output, so the row
// crosses memory once each way; the passes between work on the fp32 copy in L1/L2. The patch needs
// H_N diag(s/d) H_N: the forward passes, then the last hi pass scales in registers between its
// stages and their repeat, then the passes in reverse order. For K > 1 the K sub-rows are
// transformed one after the other and H_K is applied across them, a column of W lanes at a time, as
// fp32 multiply-adds with the +-1 entries (exact), with s/d between the two H_K of the patch.
//
// Memory: a row's passes over its buffer take about as long as reading and writing the row, and the
// core does not overlap the two by itself (the buffer passes make no memory requests, and the
// hardware prefetcher runs only a little ahead of the demand stream). So every pass over the buffer
// also prefetches a share of the next row's input (Prefetch).

struct F32Tag {};
struct BF16Tag {};
struct F16Tag {};

template <class Tag>
struct Elem;
template <>
struct Elem<F32Tag> { using type = float; };
template <>
struct Elem<BF16Tag> { using type = uint16_t; };
template <>
struct Elem<F16Tag> { using type = uint16_t; };

template <class Tag>
inline typename Vec::T load_as_f32(const typename Elem<Tag>::type* p);
template <>
inline typename Vec::T load_as_f32<F32Tag>(const float* p) { return Vec::load(p); }
template <>
inline typename Vec::T load_as_f32<BF16Tag>(const uint16_t* p) { return Vec::load_bf16(p); }
template <>
inline typename Vec::T load_as_f32<F16Tag>(const uint16_t* p) { return Vec::load_f16(p); }

template <class Tag>
inline void store_from_f32(typename Elem<Tag>::type* p, typename Vec::T v);
template <>
inline void store_from_f32<F32Tag>(float* p, typename Vec::T v) { Vec::store(p, v); }
template <>
inline void store_from_f32<BF16Tag>(uint16_t* p, typename Vec::T v) { Vec::store_bf16(p, v); }
template <>
inline void store_from_f32<F16Tag>(uint16_t* p, typename Vec::T v) { Vec::store_f16(p, v); }

#if defined(__GNUC__) || defined(__clang__)
#define LP_ALWAYS_INLINE __attribute__((always_inline))
#else
#define LP_ALWAYS_INLINE
#endif
using VT = typename Vec::T;
constexpr int kW = Vec::W;

// Butterflies over the R low bits of the index of 2**R vectors held in registers.
template <int R>
inline void stages(VT* v) {
  for (int b = 0; b < R; ++b) {
    for (int i = 0; i < (1 << R); ++i) {
      if (i & (1 << b)) continue;
      const VT a = v[i], c = v[i | (1 << b)];
      v[i] = Vec::add(a, c);
      v[i | (1 << b)] = Vec::sub(a, c);
    }
  }
}

// The passes of one row of N = 2**log2_n values (N >= W): lo covers the lane stages and `lo_bits`
// vector bits; hi pass j covers vector bits [hi_lo[j], hi_lo[j] + hi_bits[j]).
struct Plan {
  int64_t n;
  int64_t vectors;
  int lo_bits;
  int hi_count;
  int hi_lo[24];
  int hi_bits[24];
};

inline Plan make_plan(int log2_n) {
  Plan p{};
  p.n = int64_t(1) << log2_n;
  int log2_w = 0;
  while ((1 << log2_w) < kW) ++log2_w;
  const int vbits = log2_n - log2_w;
  p.vectors = int64_t(1) << vbits;
  p.lo_bits = vbits < 2 ? vbits : 2;
  for (int bit = p.lo_bits; bit < vbits;) {
    const int r = vbits - bit < 3 ? vbits - bit : 3;
    p.hi_lo[p.hi_count] = bit;
    p.hi_bits[p.hi_count] = r;
    ++p.hi_count;
    bit += r;
  }
  return p;
}

// ---- Prefetch of the next row ------------------------------------------------------------------------

// Each group of a pass that reads the buffer (not the input) calls step(), which prefetches `lines`
// cache lines of each of the next row's inputs (x, and the epilogue's u), so that reading the
// next row overlaps this row's work on the buffer. `lines` spreads the row over the steps the op
// makes per row (buffered_steps): prefetching the whole next row at the start of a row gained
// nothing (measured). The binding asks for it on large inputs only (RowArgs::prefetch): on an input
// that stays in cache the prefetches are pure cost (the patch 3.6 -> 4.2 ms on 2048 x 4096 fp32 in L2).
// The lines go into L1 (prefetcht0; a little faster than into L2 at d = 4096) when the next row and
// the buffer fit L1 together (32 KiB, the smallest L1 of the CPUs this runs on), into L2 otherwise.
struct Prefetch {
  const char* next[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};
  int64_t lines = 0;
  bool to_l1 = false;
  void step() {
    for (int s = 0; s < 2; ++s) {
      for (int64_t i = 0; i < lines && next[s] < end[s]; ++i, next[s] += 64) {
#if defined(__GNUC__) || defined(__clang__)
        if (to_l1) {
          __builtin_prefetch(next[s], 0, 3);
        } else {
          __builtin_prefetch(next[s], 0, 2);
        }
#endif
      }
    }
  }
};

LP_ALWAYS_INLINE inline void pf_step(Prefetch* pf) {
  if (pf != nullptr) pf->step();
}

// ---- Loaders and storers of W elements at element offset e ----------------------------------------

template <class Tag>
struct LoadRow {  // one input row, converted to fp32
  const typename Elem<Tag>::type* x;
  VT operator()(int64_t e) const { return load_as_f32<Tag>(x + e); }
};

template <class Tag>
struct LoadSum {  // the epilogue's residual + update, added in fp32
  const typename Elem<Tag>::type* x;
  const typename Elem<Tag>::type* u;
  VT operator()(int64_t e) const { return Vec::add(load_as_f32<Tag>(x + e), load_as_f32<Tag>(u + e)); }
};

struct LoadBuf {
  const float* buf;
  VT operator()(int64_t e) const { return Vec::load(buf + e); }
};

struct StoreBuf {
  float* buf;
  void operator()(int64_t e, VT v) const { Vec::store(buf + e, v); }
};

template <class Tag>
struct StoreScaled {  // y = v * scale, converted
  typename Elem<Tag>::type* y;
  VT scale;
  void operator()(int64_t e, VT v) const { store_from_f32<Tag>(y + e, Vec::mul(v, scale)); }
};

template <class Tag>
struct StoreRow {
  typename Elem<Tag>::type* y;
  void operator()(int64_t e, VT v) const { store_from_f32<Tag>(y + e, v); }
};

struct StoreSumSq {  // fp32 into the buffer, accumulating the sum of squares (the epilogue's h)
  float* buf;
  VT* acc;
  void operator()(int64_t e, VT v) const {
    Vec::store(buf + e, v);
    *acc = Vec::fma(v, v, *acc);
  }
};

// ---- Passes -----------------------------------------------------------------------------------------

// lo pass: groups of 2**L consecutive vectors. `mid` != nullptr: the patch's middle, done here when
// the row has no hi pass: stages, times s/d, the same stages again.
template <int L, class Load, class Store>
LP_ALWAYS_INLINE inline void lo_pass_l(const Plan& p, const Load& load, const Store& store, const float* mid, Prefetch* pf) {
  constexpr int G = 1 << L;
  for (int64_t g = 0; g < p.vectors; g += G) {
    pf_step(pf);
    VT v[G];
    for (int t = 0; t < G; ++t) v[t] = Vec::inner(load((g + t) * kW));
    stages<L>(v);
    if (mid != nullptr) {
      for (int t = 0; t < G; ++t) v[t] = Vec::mul(v[t], Vec::load(mid + (g + t) * kW));
      stages<L>(v);
      for (int t = 0; t < G; ++t) v[t] = Vec::inner(v[t]);
    }
    for (int t = 0; t < G; ++t) store((g + t) * kW, v[t]);
  }
}

template <class Load, class Store>
LP_ALWAYS_INLINE inline void lo_pass(const Plan& p, const Load& load, const Store& store, Prefetch* pf = nullptr,
                    const float* mid = nullptr) {
  switch (p.lo_bits) {
    case 0: lo_pass_l<0>(p, load, store, mid, pf); break;
    case 1: lo_pass_l<1>(p, load, store, mid, pf); break;
    default: lo_pass_l<2>(p, load, store, mid, pf); break;
  }
}

// hi pass j: 2**R vectors 2**lo vectors apart; `mid` as in lo_pass_l.
template <int R, class Load, class Store>
LP_ALWAYS_INLINE inline void hi_pass_r(const Plan& p, int lo, const Load& load, const Store& store, const float* mid, Prefetch* pf) {
  const int64_t stride = int64_t(1) << lo;  // in vectors
  for (int64_t block = 0; block < p.vectors; block += stride << R) {
    for (int64_t o = 0; o < stride; ++o) {
      pf_step(pf);
      VT v[1 << R];
      for (int t = 0; t < (1 << R); ++t) v[t] = load((block + o + t * stride) * kW);
      stages<R>(v);
      if (mid != nullptr) {
        for (int t = 0; t < (1 << R); ++t) v[t] = Vec::mul(v[t], Vec::load(mid + (block + o + t * stride) * kW));
        stages<R>(v);
      }
      for (int t = 0; t < (1 << R); ++t) store((block + o + t * stride) * kW, v[t]);
    }
  }
}

template <class Load, class Store>
LP_ALWAYS_INLINE inline void hi_pass(const Plan& p, int j, const Load& load, const Store& store, Prefetch* pf = nullptr,
                    const float* mid = nullptr) {
  switch (p.hi_bits[j]) {
    case 1: hi_pass_r<1>(p, p.hi_lo[j], load, store, mid, pf); break;
    case 2: hi_pass_r<2>(p, p.hi_lo[j], load, store, mid, pf); break;
    default: hi_pass_r<3>(p, p.hi_lo[j], load, store, mid, pf); break;
  }
}

// All of H_N on one sub-row: from `load` into buf (fp32).
template <class Load>
inline void forward_subrow(const Plan& p, const Load& load, float* buf, Prefetch* pf) {
  lo_pass(p, load, StoreBuf{buf});
  for (int j = 0; j < p.hi_count; ++j) hi_pass(p, j, LoadBuf{buf}, StoreBuf{buf}, pf);
}

// All of H_N on one fp32 sub-row in buf, the lo pass last, writing with `store`.
template <class Store>
inline void backward_subrow(const Plan& p, float* buf, const Store& store, Prefetch* pf) {
  for (int j = p.hi_count - 1; j >= 0; --j) hi_pass(p, j, LoadBuf{buf}, StoreBuf{buf}, pf);
  lo_pass(p, LoadBuf{buf}, store, pf);
}

// The number of Prefetch steps one row of `a` makes (the groups of its passes that read the buffer),
// following the order of the passes in RowKernels below.
inline int64_t buffered_steps(const RowArgs& a, const Plan& p) {
  const int64_t lo = p.vectors >> p.lo_bits;
  int64_t hi_all = 0;
  for (int j = 0; j < p.hi_count; ++j) hi_all += p.vectors >> p.hi_bits[j];
  if (a.k > 1) return a.op == Op::kTransform ? a.k * hi_all : a.k * (2 * hi_all + lo);
  if (p.hi_count == 0) return 0;  // one pass, from x to y
  if (a.op == Op::kTransform) return hi_all - (p.vectors >> p.hi_bits[0]) + lo;
  return 2 * hi_all - (p.vectors >> p.hi_bits[p.hi_count - 1]) + lo;
}

// H_K across the K sub-rows of `src`, for the W columns at offset c of each sub-row:
// out_i = sum_j h[i][j] src_j, for i in [i0, i0 + B). h is +-1: the fp32 multiply-adds are exact
// products, so this rounds like a sum of K terms.
template <int B>
inline void column_block(const float* h, int k, const float* src, int64_t n, int64_t c, int i0, VT* out) {
  for (int t = 0; t < B; ++t) out[t] = Vec::zero();
  for (int j = 0; j < k; ++j) {
    const VT xj = Vec::load(src + j * n + c);
    for (int t = 0; t < B; ++t) out[t] = Vec::fma(Vec::set1(h[(i0 + t) * k + j]), xj, out[t]);
  }
}

// For each column of W lanes: element (i, c) of H_K buf, passed to `emit(i, c, value)`.
template <class Emit>
inline void h_k_columns(const float* h, int k, const float* buf, int64_t n, const Emit& emit) {
  for (int64_t c = 0; c < n; c += kW) {
    int i0 = 0;
    for (; i0 + 8 <= k; i0 += 8) {
      VT out[8];
      column_block<8>(h, k, buf, n, c, i0, out);
      for (int t = 0; t < 8; ++t) emit(i0 + t, c, out[t]);
    }
    for (; i0 < k; i0 += 4) {  // K is a multiple of 4
      VT out[4];
      column_block<4>(h, k, buf, n, c, i0, out);
      for (int t = 0; t < 4; ++t) emit(i0 + t, c, out[t]);
    }
  }
}

// The patch's middle for K > 1, per column: tmp = (H_K buf) * s/d, then buf = H_K tmp.
inline void h_k_scale_h_k(const float* h, int k, float* buf, int64_t n, const float* sd, float* tmp) {
  for (int64_t c = 0; c < n; c += kW) {
    int i0 = 0;
    for (; i0 + 8 <= k; i0 += 8) {
      VT out[8];
      column_block<8>(h, k, buf, n, c, i0, out);
      for (int t = 0; t < 8; ++t) Vec::store(tmp + (i0 + t) * kW, Vec::mul(out[t], Vec::load(sd + (i0 + t) * n + c)));
    }
    for (; i0 < k; i0 += 4) {
      VT out[4];
      column_block<4>(h, k, buf, n, c, i0, out);
      for (int t = 0; t < 4; ++t) Vec::store(tmp + (i0 + t) * kW, Vec::mul(out[t], Vec::load(sd + (i0 + t) * n + c)));
    }
    // tmp holds K vectors laid out with row stride W.
    i0 = 0;
    for (; i0 + 8 <= k; i0 += 8) {
      VT out[8];
      column_block<8>(h, k, tmp, kW, 0, i0, out);
      for (int t = 0; t < 8; ++t) Vec::store(buf + (i0 + t) * n + c, out[t]);
    }
    for (; i0 < k; i0 += 4) {
      VT out[4];
      column_block<4>(h, k, tmp, kW, 0, i0, out);
      for (int t = 0; t < 4; ++t) Vec::store(buf + (i0 + t) * n + c, out[t]);
    }
  }
}

// ---- One row per op -------------------------------------------------------------------------------

template <class Tag>
struct RowKernels {
  using E = typename Elem<Tag>::type;

  // K = 1: the first hi pass reads x and the lo pass writes y (the stages commute), so that y is
  // written in runs of 2**lo_bits consecutive vectors, as by the patch, not 8 vectors far apart at
  // a time (d = 4096 fp32, one thread, into a preallocated output: 7.3 -> 6.6 ms, 6.5 ms with the prefetch).
  static void transform(const RowArgs& a, const Plan& p, const E* x, E* y, float* buf, Prefetch* pf) {
    const VT scale = Vec::set1(a.out_scale);
    if (a.k == 1) {
      if (p.hi_count == 0) {
        lo_pass(p, LoadRow<Tag>{x}, StoreScaled<Tag>{y, scale});
        return;
      }
      hi_pass(p, 0, LoadRow<Tag>{x}, StoreBuf{buf});
      for (int j = 1; j < p.hi_count; ++j) hi_pass(p, j, LoadBuf{buf}, StoreBuf{buf}, pf);
      lo_pass(p, LoadBuf{buf}, StoreScaled<Tag>{y, scale}, pf);
      return;
    }
    for (int i = 0; i < a.k; ++i) forward_subrow(p, LoadRow<Tag>{x + i * p.n}, buf + i * p.n, pf);
    h_k_columns(a.h_k, a.k, buf, p.n, EmitScaled{y, p.n, scale});
  }

  struct EmitScaled {  // element (i, c) of the K x N result, times the transform's scale
    E* y;
    int64_t n;
    VT scale;
    void operator()(int i, int64_t c, VT v) const { store_from_f32<Tag>(y + i * n + c, Vec::mul(v, scale)); }
  };

  // x . H_d diag(s/d) H_d from `load` into `store` (both over the whole row of d elements).
  template <class Load, class Store>
  static void patch_row(const RowArgs& a, const Plan& p, const Load& load, const Store& store, float* buf, float* tmp,
                        Prefetch* pf) {
    if (a.k == 1) {
      if (p.hi_count == 0) {
        lo_pass(p, load, store, nullptr, a.scale);
        return;
      }
      lo_pass(p, load, StoreBuf{buf});
      for (int j = 0; j + 1 < p.hi_count; ++j) hi_pass(p, j, LoadBuf{buf}, StoreBuf{buf}, pf);
      hi_pass(p, p.hi_count - 1, LoadBuf{buf}, StoreBuf{buf}, pf, a.scale);
      backward_subrow_from(p, p.hi_count - 2, buf, store, pf);
      return;
    }
    for (int i = 0; i < a.k; ++i) forward_subrow(p, Shifted<Load>{load, i * p.n}, buf + i * p.n, pf);
    h_k_scale_h_k(a.h_k, a.k, buf, p.n, a.scale, tmp);
    for (int i = 0; i < a.k; ++i) backward_subrow(p, buf + i * p.n, Shifted<Store>{store, i * p.n}, pf);
  }

  template <class F>
  struct Shifted {  // a loader or storer of the whole row, seen from sub-row offset `off`
    F f;
    int64_t off;
    VT operator()(int64_t e) const { return f(e + off); }
    void operator()(int64_t e, VT v) const { f(e + off, v); }
  };

  template <class Store>
  static void backward_subrow_from(const Plan& p, int last, float* buf, const Store& store, Prefetch* pf) {
    for (int j = last; j >= 0; --j) hi_pass(p, j, LoadBuf{buf}, StoreBuf{buf}, pf);
    lo_pass(p, LoadBuf{buf}, store, pf);
  }

  static void patch(const RowArgs& a, const Plan& p, const E* x, E* y, float* buf, float* tmp, Prefetch* pf) {
    patch_row(a, p, LoadRow<Tag>{x}, StoreRow<Tag>{y}, buf, tmp, pf);
  }

  static void epilogue(const RowArgs& a, const Plan& p, const E* x, const E* u, E* h, E* nrm, float* buf,
                       float* tmp, Prefetch* pf) {
    VT acc = Vec::zero();
    patch_row(a, p, LoadSum<Tag>{x, u}, StoreSumSq{buf, &acc}, buf, tmp, pf);
    // n = h * rsqrt(mean(h^2) + eps) * w, from the fp32 h; h itself rounded once to the output dtype.
    const float rstd = 1.0f / std::sqrt(Vec::hsum(acc) / float(a.d) + a.eps);
    const VT r = Vec::set1(rstd);
    for (int64_t e = 0; e < a.d; e += kW) {
      const VT v = Vec::load(buf + e);
      store_from_f32<Tag>(h + e, v);
      store_from_f32<Tag>(nrm + e, Vec::mul(Vec::mul(v, r), Vec::load(a.weight + e)));
    }
  }

  static void rows(const RowArgs& a, int64_t begin, int64_t end) {
    const Plan p = make_plan(a.log2_n);
    float* buf = scratch(size_t(a.d) + size_t(a.k) * kW);
    float* tmp = buf + a.d;
    const E* x = static_cast<const E*>(a.x);
    const E* u = static_cast<const E*>(a.update);
    E* y = static_cast<E*>(a.y);
    const int64_t row_bytes = a.d * int64_t(sizeof(E));
    const int64_t steps = buffered_steps(a, p);
    const int64_t row_lines = (row_bytes + 63) / 64;
    const int64_t input_bytes = row_bytes * (a.op == Op::kEpilogue ? 2 : 1);
    const bool l1_fits = input_bytes + a.d * int64_t(sizeof(float)) <= (int64_t(32) << 10);
    for (int64_t r = begin; r < end; ++r) {
      const E* xr = x + r * a.x_stride;
      E* yr = y + r * a.d;
      Prefetch pf;
      if (a.prefetch && steps > 0 && r + 1 < end) {  // the next row of this chunk
        pf.lines = (row_lines + steps - 1) / steps;
        pf.to_l1 = l1_fits;
        pf.next[0] = reinterpret_cast<const char*>(xr + a.x_stride);
        pf.end[0] = pf.next[0] + row_bytes;
        if (a.op == Op::kEpilogue) {
          pf.next[1] = reinterpret_cast<const char*>(u + (r + 1) * a.u_stride);
          pf.end[1] = pf.next[1] + row_bytes;
        }
      }
      switch (a.op) {
        case Op::kTransform: transform(a, p, xr, yr, buf, &pf); break;
        case Op::kPatch: patch(a, p, xr, yr, buf, tmp, &pf); break;
        case Op::kEpilogue:
          epilogue(a, p, xr, u + r * a.u_stride, yr, static_cast<E*>(a.normed) + r * a.d, buf, tmp, &pf);
          break;
      }
    }
  }

  // One fp32 buffer per thread, 64-byte aligned, grown on demand and kept for the next call.
  static float* scratch(size_t floats) {
    struct Buffer {
      float* p = nullptr;
      size_t n = 0;
      ~Buffer() { ::operator delete[](p, std::align_val_t(64)); }
    };
    thread_local Buffer b;
    if (b.n < floats) {
      ::operator delete[](b.p, std::align_val_t(64));
      b.p = static_cast<float*>(::operator new[](floats * sizeof(float), std::align_val_t(64)));
      b.n = floats;
    }
    return b.p;
  }
};

inline void rows_any(const RowArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::kFloat32: RowKernels<F32Tag>::rows(a, begin, end); break;
    case DType::kBFloat16: RowKernels<BF16Tag>::rows(a, begin, end); break;
    case DType::kFloat16: RowKernels<F16Tag>::rows(a, begin, end); break;
  }
}
