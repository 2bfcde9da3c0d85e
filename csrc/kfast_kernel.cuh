// kfast_kernel: K > 1 at the hidden sizes of real models (kfast_size below); the other (K, N) pairs
// use kron_kernel.
//
// The sign tables are the Paley constructions of linearpatch_kernels/hadamard.py, evaluated at
// compile time (paley_entry below mirrors _paley1/_paley2 entry by entry; the emulation tests
// compare every instance with the fp64 reference built from hadamard_matrix), so the h_k operand
// is not read. Applying H_K to a column x of K values costs, per group of 4 inputs (a, b, c, d),
// the 8 combinations a +- b +- c +- d (14 adds), and per output one add per group:
//     (H_K x)_i = sum_q sgn(H_K[i][4q]) * comb_q[pattern of H_K[i][4q..4q+3] relative to its first]
// i.e. 3.5 + K/4 - 1 adds per element instead of the K - 1 multiply-adds of a dense product.
//
// A block owns a tile of P whole rows (P d fp32 in shared memory, 4 words of padding per 32 so that
// every access below is conflict-free or nearly so) and loops over tiles (persistent grid):
//   1. global -> registers (16-byte vectors; a thread takes R of them U vectors apart in one K-row,
//      consecutive threads on consecutive vectors, so loads are coalesced), H_N over the bits of n
//      inside a vector and the top log2 R bits, -> shared memory (the epilogue adds `update` here);
//   2. H_N over the remaining bits of n, in passes of up to 3 bits: a thread takes 2**B float4 at
//      stride 2**S, butterflies them, writes them back;
//   3. the column pass: a thread takes C adjacent columns of every K-row of one row, applies H_K,
//      and for the patch * s and H_K again (the stages commute, so both H_K run back to back
//      without leaving registers);
//   4. (patch) step 2 again; 5. shared memory -> registers, (patch) H_N over the bits of step 1,
//      * out_scale, 16-byte stores;
//   6. (fused epilogue) step 5 leaves h in shared memory instead; warp w sums the squares of rows
//      w, w + 8, ... in a fixed order (deterministic), then h and normed leave as 16-byte vectors
//      (the norm weight read through the L1 cache, 16 bytes at a time).
// Every loop over work items has a compile-time trip count and is unrolled (a guard, not a loop,
// covers the last partial round), so the row-tile loop is the kernel's only loop.
#pragma once

#include "kernel_primitives.cuh"

namespace linearpatch_cuda {

__host__ __device__ constexpr int mod_pow(int base, int exp, int mod) {
  long long result = 1, b = base % mod;
  while (exp > 0) {
    if (exp & 1) result = result * b % mod;
    b = b * b % mod;
    exp >>= 1;
  }
  return int(result);
}

__host__ __device__ constexpr bool is_prime_number(int q) {
  if (q < 2) return false;
  for (int f = 2; f * f <= q; ++f)
    if (q % f == 0) return false;
  return true;
}

// chi(x): the quadratic character of GF(q) (Euler's criterion), chi(0) = 0.
__host__ __device__ constexpr int quadratic_character(int x, int q) {
  x = ((x % q) + q) % q;
  return x == 0 ? 0 : (mod_pow(x, (q - 1) / 2, q) == 1 ? 1 : -1);
}

// H_K[a][b] of hadamard.py's construction for K (Paley I for K - 1 prime = 3 mod 4, else Paley II).
__host__ __device__ constexpr int paley_entry(int k, int a, int b) {
  if (is_prime_number(k - 1) && (k - 1) % 4 == 3) {
    // I + C, columns permuted by b -> -b of GF(q), column 0 negated.
    const int q = k - 1;
    if (b == 0) return a == 0 ? -1 : 1;
    if (a == 0) return 1;
    const int pb = 1 + ((1 - b) % q + q) % q;
    return quadratic_character((a - 1) - (pb - 1), q) + (a == pb ? 1 : 0);
  }
  // C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]], C = [[0, 1^T], [1, Q]].
  const int q = k / 2 - 1, i = a / 2, j = b / 2, u = a % 2, v = b % 2;
  if (i == j) return (u == 0 && v == 0) ? 1 : -1;
  const int c = (i == 0 || j == 0) ? 1 : quadratic_character(i - j, q);
  return (u == 1 && v == 1) ? -c : c;
}

// Contribution of input group q to output i: +-comb[p].
template <int K, int I, int Q>
__device__ __forceinline__ float hk_term(const float (&comb)[8]) {
  constexpr int s0 = paley_entry(K, I, 4 * Q);
  constexpr int p = (paley_entry(K, I, 4 * Q + 1) != s0 ? 1 : 0) | (paley_entry(K, I, 4 * Q + 2) != s0 ? 2 : 0) |
                    (paley_entry(K, I, 4 * Q + 3) != s0 ? 4 : 0);
  return s0 > 0 ? comb[p] : -comb[p];
}

template <int K, int Q, int... I>
__device__ __forceinline__ void hk_group(const float (&x)[K], float (&out)[K], std::integer_sequence<int, I...>) {
  // comb[p] = a + (-1)^{p&1} b + (-1)^{p>>1&1} c + (-1)^{p>>2} d
  const float a = x[4 * Q], b = x[4 * Q + 1], c = x[4 * Q + 2], d = x[4 * Q + 3];
  const float ab[2] = {a + b, a - b};
  const float abc[4] = {ab[0] + c, ab[1] + c, ab[0] - c, ab[1] - c};
  float comb[8];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    comb[p] = abc[p] + d;
    comb[p + 4] = abc[p] - d;
  }
  if constexpr (Q == 0) ((out[I] = hk_term<K, I, Q>(comb)), ...);
  else ((out[I] += hk_term<K, I, Q>(comb)), ...);
}

template <int K, int... Q>
__device__ __forceinline__ void hk_apply(const float (&x)[K], float (&out)[K], std::integer_sequence<int, Q...>) {
  // Group by group, so that only one group's combinations are live next to x and out.
  (hk_group<K, Q>(x, out, std::make_integer_sequence<int, K>{}), ...);
}

// out = H_K x with compile-time signs.
template <int K>
__device__ __forceinline__ void apply_h_k(const float (&x)[K], float (&out)[K]) {
  static_assert(K % 4 == 0, "K is a multiple of 4");
  hk_apply<K>(x, out, std::make_integer_sequence<int, K / 4>{});
}

// (K, log2 N) pairs with a kfast_kernel instance: the K > 1 hidden sizes of real models
// (576, 896, 960, 1536, 2304, 2560, 3072, 3584, 4608, 5120, 5376, 6144, 7168, 12288, 18432; 24576 = 12 x 2048
// would need 110 KiB per tile, more than sm_86/89 allow; K = 84 at 5376 takes 94.5 KiB and up to 255
// registers, unspilled on sm_80 and sm_90). Each pair is its own kernel per op and dtype (the code is unrolled for both), so
// the list stays short; other pairs run kron_kernel (K up to 252, correct, unspilled, slower).
// linearpatch_kernels/backends/cuda_backend.py mirrors this list (_FAST_SIZES).
// The fused epilogue only up to K = 36: at K = 60 (fp32) its column pass and row sums spill on sm_80.
constexpr int kFastEpilogueMaxK = 36;
template <Op kOp>
__host__ __device__ constexpr bool kfast_size(int k, int log2_n) {
  return ((k == 12 && log2_n >= 7 && log2_n <= 10) || (k == 20 && (log2_n == 7 || log2_n == 8)) ||
          (k == 28 && (log2_n == 5 || log2_n == 7 || log2_n == 8)) || (k == 36 && (log2_n == 4 || log2_n == 6 || log2_n == 7 || log2_n == 9)) ||
          (k == 60 && log2_n == 4) || (k == 84 && log2_n == 6)) &&
         (kOp != Op::kAddPatchRmsNorm || k <= kFastEpilogueMaxK);
}

constexpr int kFastThreads = 256;

template <typename T, int K_, int kLogN_>
struct FastLayout {
  static constexpr int K = K_, kLogN = kLogN_, N = 1 << kLogN, D = K * N;
  static constexpr int kLogV = VecTraits<T>::kLog, V = 1 << kLogV;
  // Steps 1 and 5: a thread holds R vectors of one K-row at a stride of U vectors, so its registers
  // own the vector bits and the top kLogR bits of n; U >= 8 keeps 8 consecutive threads on 128
  // contiguous bytes (coalesced); at most 32 values per thread.
  static constexpr int kLogR = cmax(0, cmin(kLogN - kLogV - 3, 5 - kLogV));
  static constexpr int R = 1 << kLogR, U = N / (V * R);
  static constexpr int kPassFirst = kLogV, kPassLast = kLogN - kLogR;  // step 2's bits of n
  // Columns per item of the column pass (2 K values each, held with their H_K output).
  static constexpr int C = K <= 12 ? 4 : (K <= 28 ? 2 : 1);
  // Shared-memory word of column n in a K-row: 4 words of padding after every 32.
  static __host__ __device__ constexpr int word(int n) { return n + 4 * (n >> 5); }
  static constexpr int kSegWords = word(N);
  static constexpr int kRowWords = K * kSegWords;
  // Rows per tile: enough column items for every thread.
  static constexpr int rows_per_tile() {
    int p = 1;
    while (p * N / C < kFastThreads) p *= 2;
    return p;
  }
  static constexpr int P = rows_per_tile();
  static constexpr int kTileWords = P * kRowWords;
  static_assert(kLogN >= kLogV, "a segment holds whole 16-byte vectors");
};


// Step 2: butterflies over bits [S, S + B) of n in every K-row of the tile, 4 columns per float4.
template <class L, int S, int B>
__device__ __forceinline__ void kfast_pass(float* z) {
  constexpr int kLow = S - 2, kHigh = L::kLogN - S - B;          // item bits below and above the pass
  constexpr int kItems = L::P * L::K << (kLow + kHigh), kRounds = ceil_div(kItems, kFastThreads);
#pragma unroll
  for (int round = 0; round < kRounds; ++round) {
    const int item = threadIdx.x + round * kFastThreads;
    if (kItems % kFastThreads != 0 && item >= kItems) break;
    const int lo = item & ((1 << kLow) - 1), rest = item >> kLow;
    const int hi = rest & ((1 << kHigh) - 1), seg = rest >> kHigh;
    float* const base = z + seg * L::kSegWords + L::word((lo << 2) | (hi << (S + B)));
    float v[1 << B][4];
#pragma unroll
    for (int j = 0; j < (1 << B); ++j) shared_to_registers<4>(base + L::word(j << S), v[j]);
#pragma unroll
    for (int h = 1; h < (1 << B); h <<= 1)
#pragma unroll
      for (int j = 0; j < (1 << B); ++j) {
        if (j & h) continue;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float a = v[j][i], b = v[j + h][i];
          v[j][i] = a + b;
          v[j + h][i] = a - b;
        }
      }
#pragma unroll
    for (int j = 0; j < (1 << B); ++j) registers_to_shared<4>(v[j], base + L::word(j << S));
  }
}

// Step 2 for the bits of n that steps 1 and 5 leave, 3 at a time.
template <class L, int S = L::kPassFirst>
__device__ __forceinline__ void kfast_passes(float* z) {
  if constexpr (S < L::kPassLast) {
    constexpr int B = cmin(3, L::kPassLast - S);
    kfast_pass<L, S, B>(z);
    __syncthreads();
    kfast_passes<L, S + B>(z);
  }
}

// Steps 1, 5 and 6 visit the tile's items of R vectors (a K-row `seg` and its first column `n`), the
// threads taking consecutive items: f(seg, n) for each item of this thread, unrolled (a compile-time
// count; a guard, not a loop, for the last partial round).
template <class L, class F>
__device__ __forceinline__ void kfast_vector_items(F&& f) {
  constexpr int kItems = L::P * L::K * L::U, kRounds = ceil_div(kItems, kFastThreads);
#pragma unroll
  for (int round = 0; round < kRounds; ++round) {
    const int item = threadIdx.x + round * kFastThreads;
    if (kItems % kFastThreads != 0 && item >= kItems) break;
    f(item / L::U, (item % L::U) * L::V);
  }
}

// Step 1 split in two so that a tile's global loads can be in flight during the previous tile's
// shared-memory passes: kfast_fetch issues the loads of the tile at row0 into registers (16 raw bytes
// per vector, zeros past the last row), kfast_deposit converts them, does the butterflies over the
// bits in registers and writes the tile to shared memory. A persistent block has few warps (one or
// two 256-thread blocks per SM at the large sizes), so without this HBM idles while it computes.
template <class L>
struct FastPrefetch {
  static constexpr int kRounds = ceil_div(L::P * L::K * L::U, kFastThreads);
  static constexpr int kVectors = kRounds * L::R;  // uint4 registers per thread: 4 words each
  // Only where the raw vectors fit beside the column pass (at most 32 words per thread held).
  static constexpr bool kEnabled = kVectors * 4 <= 32;
};

// Step 1's end for one item: the butterflies over the bits in registers, then the item's R vectors to
// the tile in shared memory.
template <class L>
__device__ __forceinline__ void kfast_item_to_shared(float (&v)[L::R * L::V], float* z, int seg, int n) {
  butterflies_over<0, L::kLogV + L::kLogR>(v);
  float* const out = z + seg * L::kSegWords + L::word(n);
#pragma unroll
  for (int r = 0; r < L::R; ++r) store_f32(out + L::word(r * L::U * L::V), vec_at<L::V>(v, r));
}

template <typename T, class L>
__device__ __forceinline__ void kfast_fetch(const T* __restrict__ x, int64_t row0, int nrows,
                                            uint4 (&raw)[FastPrefetch<L>::kVectors]) {
#pragma unroll
  for (int round = 0; round < FastPrefetch<L>::kRounds; ++round) {
    const int item = threadIdx.x + round * kFastThreads;
    const int seg = item / L::U, n = (item % L::U) * L::V;
#pragma unroll
    for (int r = 0; r < L::R; ++r) {
      uint4& q = raw[round * L::R + r];
      if (item < L::P * L::K * L::U && seg < nrows * L::K)
        q = *reinterpret_cast<const uint4*>(x + row0 * L::D + seg * L::N + n + r * L::U * L::V);
      else
        q = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <typename T, class L>
__device__ __forceinline__ void kfast_deposit(const uint4 (&raw)[FastPrefetch<L>::kVectors], float* z) {
#pragma unroll
  for (int round = 0; round < FastPrefetch<L>::kRounds; ++round) {
    const int item = threadIdx.x + round * kFastThreads;
    if (L::P * L::K * L::U % kFastThreads != 0 && item >= L::P * L::K * L::U) break;
    const int seg = item / L::U, n = (item % L::U) * L::V;
    float v[L::R * L::V];
#pragma unroll
    for (int r = 0; r < L::R; ++r) load_vec(reinterpret_cast<const T*>(&raw[round * L::R + r]), vec_at<L::V>(v, r));
    kfast_item_to_shared<L>(v, z, seg, n);
  }
}

// Shared memory of kfast_kernel in floats: the tile, then (epilogue) one rstd per row of the tile.
template <class L, Op kOp>
__host__ __device__ constexpr int kfast_shared_floats() {
  return L::kTileWords + (kOp == Op::kAddPatchRmsNorm ? round_up4(L::P) : 0);
}

// ptxas's own register choice (no minimum blocks given: 0), except where that choice spills and a
// minimum of 1 block lets it take what it needs:
//  * the fp16/bf16 epilogue at 6144 (K = 12, N = 512): 128 registers and 8 bytes of spills, 188 with
//    the minimum (one block per SM, like the other epilogues from 3584 up);
//  * the fp32 transform at 576 and 2304 (K = 36, N = 16 and 64) on sm_90: with every store a 16-byte
//    vector it picks 80 / 64 registers and spills 20 / 36 bytes; 127 / 96 with the minimum (2 blocks
//    of 8 warps per SM instead of 3);
//  * the fp16/bf16 transform at 18432 (K = 36, N = 512) on sm_90: 80 registers and 8 bytes of spills.
template <typename T, int K, int kLogN, Op kOp>
__host__ __device__ constexpr int kfast_min_blocks() {
  return (kOp == Op::kAddPatchRmsNorm && sizeof(T) == 2 && K == 12 && kLogN == 9) ||
                 (kOp == Op::kTransform && K == 36 && (sizeof(T) == 4 ? kLogN == 4 || kLogN == 6 : kLogN == 9))
             ? 1
             : 0;
}

template <typename T, int K, int kLogN, Op kOp>
__global__ void __launch_bounds__(kFastThreads, kfast_min_blocks<T, K, kLogN, kOp>())
kfast_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ s, int64_t rows, float out_scale,
             EpilogueOperands<T> e) {
  using L = FastLayout<T, K, kLogN>;
  constexpr bool kPatch = kOp != Op::kTransform;
  constexpr bool kEpilogue = kOp == Op::kAddPatchRmsNorm;
  extern __shared__ float4 smem4[];
  float* const z = reinterpret_cast<float*>(smem4);
  float* const rstd = z + L::kTileWords;  // epilogue only
  constexpr int kCols = L::P * L::N / L::C, kColRounds = ceil_div(kCols, kFastThreads);
  const int64_t tiles = (rows + L::P - 1) / L::P;

  // The epilogue also reads `update`, so it keeps the loads in step 1 (its registers are spent).
  constexpr bool kPrefetch = FastPrefetch<L>::kEnabled && !kEpilogue;
  uint4 next[FastPrefetch<L>::kVectors];
  auto rows_from = [&](int64_t r0) { return int(rows - r0 < L::P ? rows - r0 : L::P); };
  if constexpr (kPrefetch) {
    if (blockIdx.x < tiles) kfast_fetch<T, L>(x, int64_t(blockIdx.x) * L::P, rows_from(int64_t(blockIdx.x) * L::P), next);
  }

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * L::P;
    const int nrows = rows_from(row0);
    // 1. load, butterflies over the bits in registers, to shared memory (rows past the end as zeros).
    if constexpr (kPrefetch) {
      kfast_deposit<T, L>(next, z);
      __syncthreads();
      // The next tile's loads go out now and land during this tile's passes.
      const int64_t following = tile + gridDim.x;
      if (following < tiles) kfast_fetch<T, L>(x, following * L::P, rows_from(following * L::P), next);
    } else kfast_vector_items<L>([&](int seg, int n) {
      float v[L::R * L::V];
#pragma unroll
      for (int r = 0; r < L::R; ++r) {
        float(&vr)[L::V] = vec_at<L::V>(v, r);
        if (seg < nrows * K) {
          load_vec(x + row0 * L::D + seg * L::N + n + r * L::U * L::V, vr);
          if constexpr (kEpilogue) {
            float u[L::V];
            load_vec(e.update + row0 * L::D + seg * L::N + n + r * L::U * L::V, u);
#pragma unroll
            for (int i = 0; i < L::V; ++i) vr[i] += u[i];
          }
        } else {
#pragma unroll
          for (int i = 0; i < L::V; ++i) vr[i] = 0.f;
        }
      }
      kfast_item_to_shared<L>(v, z, seg, n);
    });
    if constexpr (!kPrefetch) __syncthreads();
    kfast_passes<L>(z);
    // 3. the column pass.
#pragma unroll
    for (int round = 0; round < kColRounds; ++round) {
      const int item = threadIdx.x + round * kFastThreads;
      if (kCols % kFastThreads != 0 && item >= kCols) break;
      const int r = item / (L::N / L::C), n = (item % (L::N / L::C)) * L::C;
      float* const col = z + r * L::kRowWords + L::word(n);
      float a[L::C][K], b[L::C][K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        float t[L::C];
        shared_to_registers<L::C>(col + k * L::kSegWords, t);
#pragma unroll
        for (int c = 0; c < L::C; ++c) a[c][k] = t[c];
      }
#pragma unroll
      for (int c = 0; c < L::C; ++c) apply_h_k<K>(a[c], b[c]);
      if constexpr (kPatch) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          float t[L::C];
          if constexpr (L::C == 4) {
            const float4 q = __ldg(reinterpret_cast<const float4*>(s + k * L::N + n));
            t[0] = q.x; t[1] = q.y; t[2] = q.z; t[3] = q.w;
          } else if constexpr (L::C == 2) {
            const float2 q = __ldg(reinterpret_cast<const float2*>(s + k * L::N + n));
            t[0] = q.x; t[1] = q.y;
          } else {
            t[0] = __ldg(s + k * L::N + n);
          }
#pragma unroll
          for (int c = 0; c < L::C; ++c) b[c][k] *= t[c];
        }
#pragma unroll
        for (int c = 0; c < L::C; ++c) apply_h_k<K>(b[c], a[c]);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        float t[L::C];
#pragma unroll
        for (int c = 0; c < L::C; ++c) t[c] = kPatch ? a[c][k] : b[c][k];
        registers_to_shared<L::C>(t, col + k * L::kSegWords);
      }
    }
    __syncthreads();
    if constexpr (kPatch) kfast_passes<L>(z);
    // 5. (patch) butterflies over the bits in registers; * out_scale (1/d for the patch), store.
    kfast_vector_items<L>([&](int seg, int n) {
      float v[L::R * L::V];
      float* const in = z + seg * L::kSegWords + L::word(n);
#pragma unroll
      for (int r = 0; r < L::R; ++r) load_f32(in + L::word(r * L::U * L::V), vec_at<L::V>(v, r));
      if constexpr (kPatch) butterflies_over<0, L::kLogV + L::kLogR>(v);  // the second transform's
      if constexpr (kEpilogue) {
        // h stays in shared memory (in place) for the row sums of step 6.
#pragma unroll
        for (int i = 0; i < L::R * L::V; ++i) v[i] *= out_scale;
#pragma unroll
        for (int r = 0; r < L::R; ++r) store_f32(in + L::word(r * L::U * L::V), vec_at<L::V>(v, r));
      } else if (seg < nrows * K) {
#pragma unroll
        for (int r = 0; r < L::R; ++r)
          store_vec(y + row0 * L::D + seg * L::N + n + r * L::U * L::V, vec_at<L::V>(v, r), out_scale);
      }
    });
    if constexpr (kEpilogue) {
      // 6. RMSNorm: warp w sums rows w, w + 8, ... (fixed slices per lane, then across the lanes:
      // deterministic), then h and normed leave as 16-byte vectors.
      __syncthreads();
      constexpr int kWarps = kFastThreads / 32, kQuads = K * L::N / 4, kPerLane = ceil_div(kQuads, 32);
      const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
      for (int j = 0; j < ceil_div(L::P, kWarps); ++j) {
        const int r = warp + j * kWarps;
        if (L::P % kWarps != 0 && r >= L::P) break;
        float acc = 0.f;
#pragma unroll
        for (int q = 0; q < kPerLane; ++q) {
          const int quad = lane + 32 * q;
          if (kQuads % 32 != 0 && quad >= kQuads) break;
          const int k = quad / (L::N / 4), n = 4 * (quad % (L::N / 4));
          const float4 h = *reinterpret_cast<const float4*>(z + r * L::kRowWords + k * L::kSegWords + L::word(n));
          acc = fmaf(h.x, h.x, acc);
          acc = fmaf(h.y, h.y, acc);
          acc = fmaf(h.z, h.z, acc);
          acc = fmaf(h.w, h.w, acc);
        }
        acc = sum_over_lanes<32>(acc);
        if (lane == 0) rstd[r] = rsqrtf(acc * (1.f / L::D) + e.eps);
      }
      __syncthreads();
      kfast_vector_items<L>([&](int seg, int n) {
        if (seg < nrows * K) {
          const float* const in = z + seg * L::kSegWords + L::word(n);
          const int64_t off = row0 * L::D + seg * L::N + n;
          const float* const w = e.weight + (seg % K) * L::N + n;
#pragma unroll
          for (int r = 0; r < L::R; ++r) {
            float h[L::V];
            load_f32(in + L::word(r * L::U * L::V), h);
            const int at = r * L::U * L::V;
            store_h_and_normed(y + off + at, e.normed + off + at, w + at, h, rstd[seg / K]);
          }
        }
      });
    }
    __syncthreads();  // the tile's reads are done before the next tile's writes
  }
}

}  // namespace linearpatch_cuda
