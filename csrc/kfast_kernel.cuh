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

// The first H_K on the tensor cores (fp16/bf16 inputs, K <= 36: see "Tensor cores" below), where the
// tile, the raw input tile and (epilogue) the raw update tile fit kFastSmemBudget.
constexpr int kFastTensorCoreMaxK = 36;

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
  // Rows per tile: enough column items for every thread.
  static constexpr int rows_per_tile() {
    int p = 1;
    while (p * N / C < kFastThreads) p *= 2;
    return p;
  }
  static constexpr int P = rows_per_tile();
  // Tensor cores: the raw input tile in shared memory as fp16/bf16 K-rows of N elements and 8 more (a
  // pitch of 16 bytes beyond a multiple of 128, so the 8 rows of one ldmatrix matrix fall in 8
  // different 16-byte bank groups), then 16 zero bytes that stand for the padded rows K .. 16 ceil(K/16).
  static constexpr int kRawPitch = N + 8;
  static constexpr int kRawWords = (P * K * kRawPitch * 2 + 3) / 4 / 4 * 4 + 4;  // floats, whole float4
  // Segment stride with tensor cores: 8 or 24 (mod 32) words, so that the 8 rows g of an mma result
  // (rows g and g + 8 of D) stored as float2 fill 2 wavefronts, the fewest 256 bytes can.
  static constexpr int kPaddedSegWords = word(N) + ((8 - word(N)) & 15);  // 8 or 24 (mod 32)
  // Where the layout allows the tensor cores (the transform fits kFastSmemBudget with one raw tile and
  // H_K's fragments; kfast_tensor_cores decides per op).
  static constexpr bool kTensorCores =
      sizeof(T) == 2 && K <= kFastTensorCoreMaxK &&
      4 * (P * K * kPaddedSegWords + kRawWords + ceil_div(K, 16) * ceil_div(K, 16) * 128) <= 101376;
  static constexpr int kSegWords = kTensorCores ? kPaddedSegWords : word(N);
  static constexpr int kRowWords = K * kSegWords;
  static constexpr int kTileWords = P * kRowWords;
  static_assert(kLogN >= kLogV, "a segment holds whole 16-byte vectors");
};


// Work items of a step go to the threads in rounds of kFastThreads; where the last round is partial
// (5120: 320 items for 256 threads in steps 1, 2, 4 and 5) its items would always fall to the same
// warps, which would then issue one round more than the others in every such step, and the busiest
// scheduler sets the time. So the k-th step with a partial round rotates the thread -> item map by k
// times the warps of that partial round: across the tile every warp takes its share of the extra work.
// Thread t takes item ((t + shift) mod kFastThreads) + round * kFastThreads.
template <int kItems, int kStep>
__host__ __device__ constexpr int kfast_shift() {
  constexpr int extra = kItems % kFastThreads, warps = kFastThreads / 32;
  return extra == 0 ? 0 : (kStep * ceil_div(extra, 32) % warps) * 32;
}

template <int kItems, int kStep>
__device__ __forceinline__ int kfast_item(int round) {
  constexpr int shift = kfast_shift<kItems, kStep>();
  const int t = shift == 0 ? int(threadIdx.x) : (int(threadIdx.x) + shift) & (kFastThreads - 1);
  return t + round * kFastThreads;
}

// Step 2: butterflies over bits [S, S + B) of n in every K-row of the tile, 4 columns per float4.
template <class L, int S, int B, int kStep>
__device__ __forceinline__ void kfast_pass(float* z) {
  constexpr int kLow = S - 2, kHigh = L::kLogN - S - B;          // item bits below and above the pass
  constexpr int kItems = L::P * L::K << (kLow + kHigh), kRounds = ceil_div(kItems, kFastThreads);
#pragma unroll
  for (int round = 0; round < kRounds; ++round) {
    const int item = kfast_item<kItems, kStep>(round);
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

// Step 2 for the bits of n that steps 1 and 5 leave, 3 at a time (the passes are steps kStep, kStep + 1, ...).
template <class L, int kStep, int S = L::kPassFirst>
__device__ __forceinline__ void kfast_passes(float* z) {
  if constexpr (S < L::kPassLast) {
    constexpr int B = cmin(3, L::kPassLast - S);
    kfast_pass<L, S, B, kStep>(z);
    __syncthreads();
    kfast_passes<L, kStep + 1, S + B>(z);
  }
}

// The number of passes of step 2 (the step numbers they take).
template <class L>
__host__ __device__ constexpr int kfast_pass_count() { return ceil_div(L::kPassLast - L::kPassFirst, 3); }

// Steps 1, 5 and 6 visit the tile's items of R vectors (a K-row `seg` and its first column `n`), the
// threads taking consecutive items: f(seg, n) for each item of this thread, unrolled (a compile-time
// count; a guard, not a loop, for the last partial round).
template <class L, int kStep, class F>
__device__ __forceinline__ void kfast_vector_items(F&& f) {
  constexpr int kItems = L::P * L::K * L::U, kRounds = ceil_div(kItems, kFastThreads);
#pragma unroll
  for (int round = 0; round < kRounds; ++round) {
    const int item = kfast_item<kItems, kStep>(round);
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
    const int item = kfast_item<L::P * L::K * L::U, 0>(round);  // step 1's map, as kfast_deposit
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
    const int item = kfast_item<L::P * L::K * L::U, 0>(round);
    if (L::P * L::K * L::U % kFastThreads != 0 && item >= L::P * L::K * L::U) break;
    const int seg = item / L::U, n = (item % L::U) * L::V;
    float v[L::R * L::V];
#pragma unroll
    for (int r = 0; r < L::R; ++r) load_vec(reinterpret_cast<const T*>(&raw[round * L::R + r]), vec_at<L::V>(v, r));
    kfast_item_to_shared<L>(v, z, seg, n);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor cores: the first H_K on the raw fp16/bf16 input.
//
// H_K X (X the K x N view of a row) is a +-1 matrix times fp16/bf16 values: the tensor cores multiply
// those exactly and sum in fp32, so this stage needs no split of its inputs into high and low parts
// (which fp32 inputs would: that is why only the first H_K, on the raw input, runs there; the second
// H_K of the patch keeps the +-1 add network). The stages commute (H_d = H_K (x) H_N), so the patch
// runs H_K first, then H_N, * s, H_K, H_N; the epilogue sums H_K x + H_K u in the accumulators
// (exact again: no fp32 x + u before the product).
// mma.m16n8k16 computes D = A B with A = H_K padded with zeros to 16 ceil(K / 16) rows and columns
// (constant fragments, built per lane from the compile-time Paley signs) and B = a 16-row slice of X
// by 8 columns, read from the raw tile with ldmatrix.trans (8 x 8 matrices whose rows are K-rows of X:
// a lane receives a column pair, the layout of B). Work item: one P-row and 16 columns; a warp takes
// every 8th item (P N / 16 items, a multiple of 8 at every size: balanced). The result (rows g, g + 8
// of each 16-row tile, columns 2t, 2t + 1 of each 8-column tile) goes to the fp32 tile as float2.
// The raw tile comes by cp.async: the next tile's copies leave as soon as this tile's products are in
// the fp32 tile, and land during its passes (a whole tile in flight per block, no registers held).

// bit k of hk_row_bits(K, m): H_K[m][k] < 0 (0 for the padded rows m >= K).
__host__ __device__ constexpr uint64_t hk_row_bits(int k, int m) {
  uint64_t bits = 0;
  if (m < k)
    for (int c = 0; c < k; ++c)
      if (paley_entry(k, m, c) < 0) bits |= uint64_t(1) << c;
  return bits;
}

template <int K, int M>
struct HkRow {
  static constexpr uint64_t bits = hk_row_bits(K, M);
};

// The sign bits of row kBase + g for a runtime g in [0, 8) (the row of a lane's fragment).
template <int K, int kBase, int... I>
__device__ __forceinline__ uint64_t hk_row_of(int g, std::integer_sequence<int, I...>) {
  uint64_t r = 0;
  ((r = g == I ? HkRow<K, kBase + I>::bits : r), ...);
  return r;
}

// The A fragments of the padded H_K live in shared memory (built once per block, an LDS.128 per use:
// held in registers through the tile they would cost up to 36 of them, and spill the column pass).
template <int K>
struct HkTiles {
  static constexpr int kTiles = ceil_div(K, 16);        // 16-row (and 16-column) tiles of the padded H_K
  static constexpr int kWords = kTiles * kTiles * 32 * 4;  // [m tile][k step][lane][register]
};

// Lane's A fragments of the padded H_K into `f`: register r of tile (mt, ks) holds rows 16 mt + g (+ 8
// for r = 1, 3) and columns 16 ks + 2t, 2t + 1 (+ 8 for r = 2, 3), as two 16-bit +-1.0 (or 0 in the
// padding), at f[((mt * kTiles + ks) * 32 + lane) * 4 + r].
template <typename T, int K, int kMt = 0>
__device__ __forceinline__ void hk_fragments(uint32_t* f, int lane) {
  constexpr int kTiles = HkTiles<K>::kTiles;
  if constexpr (kMt < kTiles) {
    const int g = lane >> 2, t = lane & 3;
    const uint64_t rows[2] = {hk_row_of<K, 16 * kMt>(g, std::make_integer_sequence<int, 8>{}),
                              hk_row_of<K, 16 * kMt + 8>(g, std::make_integer_sequence<int, 8>{})};
    const bool real[2] = {16 * kMt + g < K, 16 * kMt + 8 + g < K};
#pragma unroll
    for (int ks = 0; ks < kTiles; ++ks) {
      uint32_t words[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int half = r & 1, c = 16 * ks + 2 * t + 8 * (r >> 1);
        uint32_t word = 0;
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (real[half] && c + e < K)
            word |= (one_bits<T>() | ((rows[half] >> (c + e)) & 1 ? 0x8000u : 0u)) << (16 * e);
        words[r] = word;
      }
      *reinterpret_cast<uint4*>(f + ((kMt * kTiles + ks) * 32 + lane) * 4) = make_uint4(words[0], words[1], words[2], words[3]);
    }
    hk_fragments<T, K, kMt + 1>(f, lane);
  }
}

// cp.async copies of the tile at row0 (fp16/bf16, nrows real rows, zeros past them) into `raw`.
template <typename T, class L>
__device__ __forceinline__ void kfast_fetch_raw(const T* __restrict__ src, int64_t row0, int nrows, T* raw) {
  constexpr int kVectors = L::P * L::K * (L::N / 8), kRounds = ceil_div(kVectors, kFastThreads);
  const T* const tile = src + row0 * L::D;  // one 64-bit address per tile, 32-bit offsets per copy
  const int real_segs = nrows * L::K;
#pragma unroll
  for (int round = 0; round < kRounds; ++round) {
    const int i = threadIdx.x + round * kFastThreads;
    if (kVectors % kFastThreads != 0 && i >= kVectors) break;
    const int seg = i / (L::N / 8), c = (i % (L::N / 8)) * 8;
    const bool real = seg < real_segs;
    __pipeline_memcpy_async(raw + seg * L::kRawPitch + c, tile + (real ? seg * L::N + c : 0), 16, real ? 0 : 16);
  }
}

// z = H_K X for the tile (X from `raw`, plus the tile `raw2` when given: H_K (x + u) = H_K x + H_K u).
template <typename T, class L>
__device__ __forceinline__ void kfast_hk_tensor_cores(const uint32_t* f, const T* raw, const T* raw2, const T* zero,
                                                      float* z) {
  constexpr int kTiles = HkTiles<L::K>::kTiles, kItems = L::P * (L::N / 16), kWarps = kFastThreads / 32;
  static_assert(kItems % kWarps == 0, "every warp takes as many 16-column items");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 1
  for (int item = warp; item < kItems; item += kWarps) {
    const int r = item / (L::N / 16), n0 = (item % (L::N / 16)) * 16;
    float acc[kTiles][2][4];
#pragma unroll
    for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.f;
#pragma unroll
    for (int src = 0; src < (raw2 == nullptr ? 1 : 2); ++src) {
      const T* const base = (src == 0 ? raw : raw2) + r * L::K * L::kRawPitch;
#pragma unroll
      for (int ks = 0; ks < kTiles; ++ks) {
        // lane l: row l % 8 of matrix l / 8 = (K-rows 16 ks + 8 ((l / 8) % 2) .., columns n0 + 8 (l / 16) ..)
        const int k = 16 * ks + 8 * ((lane >> 3) & 1) + (lane & 7);
        uint32_t b[4];
        ldmatrix_x4_trans(b, k < L::K ? base + k * L::kRawPitch + n0 + 8 * (lane >> 4) : zero);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
        for (int mt = 0; mt < kTiles; ++mt) {
          const uint4 w = *reinterpret_cast<const uint4*>(f + ((mt * kTiles + ks) * 32 + lane) * 4);
          const uint32_t a[4] = {w.x, w.y, w.z, w.w};
          mma_m16n8k16<T>(acc[mt][0], a, b0, acc[mt][0]);
          mma_m16n8k16<T>(acc[mt][1], a, b1, acc[mt][1]);
        }
      }
    }
    float* const out = z + r * L::kRowWords;
#pragma unroll
    for (int mt = 0; mt < kTiles; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = 16 * mt + 8 * h + g;
        if (m < L::K) {
#pragma unroll
          for (int j = 0; j < 2; ++j)
            *reinterpret_cast<float2*>(out + m * L::kSegWords + L::word(n0 + 8 * j + 2 * t)) =
                make_float2(acc[mt][j][2 * h], acc[mt][j][2 * h + 1]);
        }
      }
  }
}

// The H_N butterflies over the bits steps 1 and 5 keep in registers (the vector bits and the top
// kLogR bits), in place in the tile: transform 1's share where step 1 is the tensor-core H_K.
template <class L, int kStep>
__device__ __forceinline__ void kfast_register_bits_in_place(float* z) {
  kfast_vector_items<L, kStep>([&](int seg, int n) {
    float v[L::R * L::V];
    float* const at = z + seg * L::kSegWords + L::word(n);
#pragma unroll
    for (int r = 0; r < L::R; ++r) load_f32(at + L::word(r * L::U * L::V), vec_at<L::V>(v, r));
    butterflies_over<0, L::kLogV + L::kLogR>(v);
#pragma unroll
    for (int r = 0; r < L::R; ++r) store_f32(at + L::word(r * L::U * L::V), vec_at<L::V>(v, r));
  });
}

// Where the tensor cores run the first H_K of an op: the layout allows it and the raw tiles (two for
// the epilogue: residual and update) fit kFastSmemBudget beside the fp32 tile.
constexpr int kFastSmemBudget = 101376;  // the smallest opt-in of the sm_80+ GPUs (sm_86/89), bytes
// The shared memory the tensor cores add: the raw tiles (two for the epilogue) and H_K's fragments.
template <class L, Op kOp>
__host__ __device__ constexpr int kfast_tensor_core_floats() {
  return (kOp == Op::kAddPatchRmsNorm ? 2 : 1) * L::kRawWords + HkTiles<L::K>::kWords;
}

// Where the tensor cores run the first H_K: the layout allows them and their shared memory fits
// kFastSmemBudget; not the patch or epilogue at N = 16 (576), whose passes already make it
// shared-memory bound: the raw tile and the in-place pass of the register bits cost more there than
// the H_K they save (by the speed model).
template <class L, Op kOp>
__host__ __device__ constexpr bool kfast_tensor_cores() {
  return L::kTensorCores && (kOp == Op::kTransform || L::kLogN > 4) &&
         4 * (L::kTileWords + (kOp == Op::kAddPatchRmsNorm ? round_up4(L::P) : 0) +
              kfast_tensor_core_floats<L, kOp>()) <= kFastSmemBudget;
}

template <class L, Op kOp>
__host__ __device__ constexpr int kfast_floats_before_s() {
  return L::kTileWords + (kOp == Op::kAddPatchRmsNorm ? round_up4(L::P) : 0) +
         (kfast_tensor_cores<L, kOp>() ? kfast_tensor_core_floats<L, kOp>() : 0);
}

// s is staged in shared memory once per block (cp.async, a copy of its d floats: the column pass
// then reads it with LDS instead of waiting for L2 in every tile) wherever the block still fits
// kFastSmemBudget; else it is read through the L1 cache.
template <class L, Op kOp>
__host__ __device__ constexpr bool kfast_stages_s() {
  return kOp != Op::kTransform && 4 * (kfast_floats_before_s<L, kOp>() + L::D) <= kFastSmemBudget;
}

// Shared memory of kfast_kernel in floats: the tile, then (epilogue) one rstd per row of the tile, then
// (tensor cores) the raw tiles, then (where staged) s.
template <class L, Op kOp>
__host__ __device__ constexpr int kfast_shared_floats() {
  return kfast_floats_before_s<L, kOp>() + (kfast_stages_s<L, kOp>() ? L::D : 0);
}

// ptxas's own register choice (no minimum blocks given: 0), except where that choice spills and a
// minimum of 1 block lets it take what it needs:
//  * the fp16/bf16 epilogue at 6144 (K = 12, N = 512): 128 registers and 8 bytes of spills, 188 with
//    the minimum (one block per SM, like the other epilogues from 3584 up);
//  * the fp32 transform at 576 and 2304 (K = 36, N = 16 and 64) on sm_90: with every store a 16-byte
//    vector it picks 80 / 64 registers and spills 20 / 36 bytes; 127 / 96 with the minimum (2 blocks
//    of 8 warps per SM instead of 3);
//  * the fp16/bf16 transform at 18432 (K = 36, N = 512) on sm_90: 80 registers and 8 bytes of spills;
//  * the fp16/bf16 patch at 2304, 2560 and 5120 (K = 36, N = 64; K = 20, N = 128 and 256) with the
//    tensor cores: 80-96 registers and 4-8 bytes of spills (2560: on sm_80).
template <typename T, int K, int kLogN, Op kOp>
__host__ __device__ constexpr int kfast_min_blocks() {
  return (kOp == Op::kPatch && sizeof(T) == 2 && (K == 20 || (K == 36 && kLogN == 6))) ||
                 (kOp == Op::kAddPatchRmsNorm && sizeof(T) == 2 && K == 12 && kLogN == 9) ||
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
  constexpr bool kTensorCores = kfast_tensor_cores<L, kOp>();
  T* const raw = reinterpret_cast<T*>(rstd + (kEpilogue ? round_up4(L::P) : 0));  // tensor cores: x's raw tile
  T* const raw_u = raw + 2 * L::kRawWords;                                         // and (epilogue) update's
  const T* const zero = raw + L::P * K * L::kRawPitch;                            // 16 zero bytes after x's
  uint32_t* const hk = reinterpret_cast<uint32_t*>(raw) + (kEpilogue ? 2 : 1) * L::kRawWords;  // H_K's fragments
  constexpr bool kStageS = kfast_stages_s<L, kOp>();
  float* const s_sm = z + kfast_floats_before_s<L, kOp>();  // where staged
  constexpr int kCols = L::P * L::N / L::C, kColRounds = ceil_div(kCols, kFastThreads);
  // Step numbers for kfast_item's rotation: step 1 is 0 (with tensor cores: the in-place register bits
  // of the patch), the passes 1, 2, ..., the passes again (the patch) and step 5 next; the column pass
  // (a partial round at other sizes than step 1's) after them.
  constexpr int kPasses = kfast_pass_count<L>();
  constexpr int kStepPasses2 = 1 + kPasses, kStepStore = kPatch ? kStepPasses2 + kPasses : kStepPasses2;
  constexpr int kStepColumns = kStepStore + 1;
  const int64_t tiles = (rows + L::P - 1) / L::P;
  auto rows_from = [&](int64_t r0) { return int(rows - r0 < L::P ? rows - r0 : L::P); };

  // The first tile's raw copies (tensor cores) and s leave together; one wait at the top of the loop.
  if constexpr (kTensorCores) {
    if (threadIdx.x == 0) *reinterpret_cast<uint4*>(const_cast<T*>(zero)) = make_uint4(0u, 0u, 0u, 0u);
    if (blockIdx.x < tiles) {
      kfast_fetch_raw<T, L>(x, int64_t(blockIdx.x) * L::P, rows_from(int64_t(blockIdx.x) * L::P), raw);
      if constexpr (kEpilogue) kfast_fetch_raw<T, L>(e.update, int64_t(blockIdx.x) * L::P, rows_from(int64_t(blockIdx.x) * L::P), raw_u);
    }
    if (threadIdx.x < 32) hk_fragments<T, K>(hk, threadIdx.x);  // read after the barrier at the loop's top
  }
  if constexpr (kStageS) {
    for (int i = threadIdx.x; i < L::D / 4; i += kFastThreads) __pipeline_memcpy_async(s_sm + 4 * i, s + 4 * i, 16);
  }
  if constexpr (kTensorCores || kStageS) __pipeline_commit();

  // Without tensor cores: the epilogue also reads `update`, so it keeps the loads in step 1 (its
  // registers are spent).
  constexpr bool kPrefetch = !kTensorCores && FastPrefetch<L>::kEnabled && !kEpilogue;
  uint4 next[FastPrefetch<L>::kVectors];
  if constexpr (kPrefetch) {
    if (blockIdx.x < tiles) kfast_fetch<T, L>(x, int64_t(blockIdx.x) * L::P, rows_from(int64_t(blockIdx.x) * L::P), next);
  }
  if constexpr (kStageS && !kTensorCores) {  // s before any column pass (the tile loop has a barrier before it)
    __pipeline_wait_prior(0);
  }

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * L::P;
    const int nrows = rows_from(row0);
    const int64_t following = tile + gridDim.x;
    if constexpr (kTensorCores) {
      // 1. the tile's raw copies have landed (and s); H_K on the tensor cores into the fp32 tile; the
      // next tile's copies leave.
      __pipeline_wait_prior(0);
      __syncthreads();
      kfast_hk_tensor_cores<T, L>(hk, raw, kEpilogue ? raw_u : nullptr, zero, z);
      __syncthreads();
      if (following < tiles) {
        kfast_fetch_raw<T, L>(x, following * L::P, rows_from(following * L::P), raw);
        if constexpr (kEpilogue) kfast_fetch_raw<T, L>(e.update, following * L::P, rows_from(following * L::P), raw_u);
      }
      __pipeline_commit();
      if constexpr (kPatch) {  // transform 1's H_N over the register bits (step 5 does transform 2's)
        kfast_register_bits_in_place<L, 0>(z);
        __syncthreads();
      }
    } else if constexpr (kPrefetch) {
      // 1. load, butterflies over the bits in registers, to shared memory (rows past the end as zeros).
      kfast_deposit<T, L>(next, z);
      __syncthreads();
      // The next tile's loads go out now and land during this tile's passes.
      if (following < tiles) kfast_fetch<T, L>(x, following * L::P, rows_from(following * L::P), next);
    } else kfast_vector_items<L, 0>([&](int seg, int n) {
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
    if constexpr (!kPrefetch && !kTensorCores) __syncthreads();
    kfast_passes<L, 1>(z);
    // 3. the column pass (with tensor cores: only the patch's * s and second H_K; the transform has none).
#pragma unroll
    for (int round = 0; round < (kTensorCores && !kPatch ? 0 : kColRounds); ++round) {
      const int item = kfast_item<kCols, kStepColumns>(round);
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
      for (int c = 0; c < L::C; ++c) {
        if constexpr (kTensorCores) {  // H_K is done: b = a
#pragma unroll
          for (int k = 0; k < K; ++k) b[c][k] = a[c][k];
        } else {
          apply_h_k<K>(a[c], b[c]);
        }
      }
      if constexpr (kPatch) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          float t[L::C];
          if constexpr (kStageS) {
            shared_to_registers<L::C>(s_sm + k * L::N + n, t);
          } else if constexpr (L::C == 4) {
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
    if constexpr (!kTensorCores || kPatch) __syncthreads();
    if constexpr (kPatch) kfast_passes<L, kStepPasses2>(z);
    // 5. (patch, or with tensor cores) butterflies over the bits in registers; * out_scale (1/d for the
    // patch), store.
    kfast_vector_items<L, kStepStore>([&](int seg, int n) {
      float v[L::R * L::V];
      float* const in = z + seg * L::kSegWords + L::word(n);
#pragma unroll
      for (int r = 0; r < L::R; ++r) load_f32(in + L::word(r * L::U * L::V), vec_at<L::V>(v, r));
      if constexpr (kPatch || kTensorCores) butterflies_over<0, L::kLogV + L::kLogR>(v);  // the last transform's
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
      kfast_vector_items<L, kStepStore>([&](int seg, int n) {
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
