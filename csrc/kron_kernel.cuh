// kron_kernel: K > 1 at the sizes without a kfast_kernel instance (K up to 252): a block owns
// `rows_per_block` rows in shared memory (fp32). H_N runs per K-row ("segment") in registers and
// across lanes; H_K runs as 4 x 4 output tiles read from shared memory.
//
// Column index layout of one segment (N contiguous elements) across the threads of a group of G
// lanes (x W warps); each thread holds R 16-byte vectors of V elements:
//     n = V * (r * G * W + w * G + g) + i
//         i: element in the vector   -> butterflies in registers
//         g: lane in the group       -> butterflies with warp shuffles
//         w: warp                    -> butterflies through shared memory
//         r: vector of the thread    -> butterflies in registers
// Consecutive lanes read consecutive 16-byte vectors, so every load and store is coalesced.
//
// How a segment of N = 2**kLogN elements is spread over a thread group (Layout below).
// Lanes of a group cover at least 8 consecutive 16-byte vectors (128 contiguous bytes) when the
// segment is that long; each thread then takes up to 2**kLogMaxValues values; lanes grow to a full
// warp next, and only then warps. Fewer lanes means fewer shuffle stages.
// kron_kernel takes up to 64 values per thread (it also holds H_K tiles and keeps whole rows in
// shared memory, so registers are what limits its blocks per multiprocessor), and its segments
// (N <= 2048) fit in one warp.
#pragma once

#include "hadamard_launch.h"
#include "kernel_primitives.cuh"

namespace linearpatch_cuda {

template <typename T, int kLogN, int kLogMaxValues = 7>
struct Layout {
  static constexpr int kLogV = VecTraits<T>::kLog;
  static constexpr int V = 1 << kLogV;
  static constexpr int kBits = kLogN - kLogV;            // bits of the vector index in a segment
  static_assert(kBits >= 0, "segments shorter than one 16-byte vector are not supported");
  static constexpr int kLogG0 = cmin(kBits, 3);
  static constexpr int kLogR = cmin(kLogMaxValues - kLogV, kBits - kLogG0);
  static constexpr int kLogG = kLogG0 + cmin(5 - kLogG0, kBits - kLogG0 - kLogR);
  static constexpr int kLogW = kBits - kLogR - kLogG;
  static constexpr int N = 1 << kLogN, R = 1 << kLogR, G = 1 << kLogG, W = 1 << kLogW;
  static_assert(kLogW <= 3, "at most 8 warps per segment");
  // Offset of vector r of the thread at position `pos` (= w * G + g) inside its segment.
  static __device__ __forceinline__ int offset(int r, int pos) { return V * (r * G * W + pos); }
};


template <int R, int V>
__device__ __forceinline__ void butterflies_in_registers(float (&v)[R][V]) {
#pragma unroll
  for (int h = 1; h < V; h <<= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (i & h) continue;
        const float a = v[r][i], b = v[r][i + h];
        v[r][i] = a + b;
        v[r][i + h] = a - b;
      }
    }
  }
#pragma unroll
  for (int h = 1; h < R; h <<= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r & h) continue;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float a = v[r][i], b = v[r + h][i];
        v[r][i] = a + b;
        v[r + h][i] = a - b;
      }
    }
  }
}

// Lanes g and g ^ h exchange values: the lower one keeps a + b, the upper one a - b, i.e.
// new = other + sign * mine with sign = -1 on the upper lane. Groups are aligned runs of G lanes.
template <int G, int R, int V>
__device__ __forceinline__ void butterflies_across_lanes(float (&v)[R][V], int lane) {
#pragma unroll
  for (int h = 1; h < G; h <<= 1) {
    const float sign = (lane & h) ? -1.f : 1.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float other = __shfl_xor_sync(0xffffffffu, v[r][i], h);
        v[r][i] = fmaf(sign, v[r][i], other);
      }
    }
  }
}

// Unnormalized H_N of one segment held as v (butterfly order does not matter: the bits commute).
template <class L>
__device__ __forceinline__ void fwht_segment(float (&v)[L::R][L::V], int lane) {
  static_assert(L::W == 1, "a segment fits in one warp");
  butterflies_in_registers(v);
  butterflies_across_lanes<L::G>(v, lane);
}

// K > 1: rows in shared memory.

constexpr int kKronThreads = 256;
constexpr int kKronTilesPerThread = 2;  // output tiles a thread holds while a tile round is in flight
constexpr int kKronLogMaxValues = 6;

// H_N of every segment of the block's rows: `src` (+ `add`, when kAdd) -> registers -> shared
// memory `z`. All groups run the same number of iterations so that the shuffles always see full warps.
template <class L, bool kAdd = false, typename Src>
__device__ __forceinline__ void fwht_segments(const Src* src, const Src* add, float* z, int nseg) {
  static_assert(L::W == 1, "segments of the K > 1 kernel fit in one warp");
  const int lane = threadIdx.x & 31, pos = threadIdx.x % L::G;
  const int group = threadIdx.x / L::G, groups = blockDim.x / L::G;
  for (int base = 0; base < nseg; base += groups) {
    const int seg = base + group;
    const bool active = seg < nseg;
    float v[L::R][L::V];
#pragma unroll
    for (int r = 0; r < L::R; ++r) {
      if (active) {
        if constexpr (sizeof(Src) == 4) load_f32(src + seg * L::N + L::offset(r, pos), v[r]);
        else load_vec(src + seg * L::N + L::offset(r, pos), v[r]);
        if constexpr (kAdd) {
          float u[L::V];
          if constexpr (sizeof(Src) == 4) load_f32(add + seg * L::N + L::offset(r, pos), u);
          else load_vec(add + seg * L::N + L::offset(r, pos), u);
#pragma unroll
          for (int i = 0; i < L::V; ++i) v[r][i] += u[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < L::V; ++i) v[r][i] = 0.f;
      }
    }
    fwht_segment<L>(v, lane);
    if (active) {
#pragma unroll
      for (int r = 0; r < L::R; ++r) store_f32(z + seg * L::N + L::offset(r, pos), v[r]);
    }
  }
}

// One 4 x 4 tile of H_K Z for a row Z (K x N, row-major, in shared memory):
//   acc[b] = sum_j H_K[kb4 + b][j] * Z[j][n4 .. n4+3] = sum_j H_K[j][kb4 + b] * Z[j][...]
// using the symmetry of H_K, so that the four coefficients are one contiguous float4 of row j.
__device__ __forceinline__ void kron_tile(const float* z, const float* __restrict__ h_k, int k,
                                          int n, int kb4, int n4, float4 (&acc)[4]) {
#pragma unroll
  for (int b = 0; b < 4; ++b) acc[b] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int j = 0; j < k; ++j) {
    const float4 zj = *reinterpret_cast<const float4*>(z + j * n + n4);
    const float4 h = __ldg(reinterpret_cast<const float4*>(h_k + j * k + kb4));
    const float hb[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      acc[b].x = fmaf(hb[b], zj.x, acc[b].x);
      acc[b].y = fmaf(hb[b], zj.y, acc[b].y);
      acc[b].z = fmaf(hb[b], zj.z, acc[b].z);
      acc[b].w = fmaf(hb[b], zj.w, acc[b].w);
    }
  }
}

struct Tile {
  int row, kb4, n4;
};

// Tile t of a block with `nq` column quads and `kq` row quads per row; column quads fastest, so
// that consecutive threads read consecutive float4 of shared memory.
__device__ __forceinline__ Tile tile_at(int t, int kq, int nq, int q0) {
  const int q = t % nq, rest = t / nq;
  return Tile{rest / kq, 4 * (rest % kq), 4 * (q0 + q)};
}

// Z <- (H_K Z) * s (kByVector: s is (d,) fp32 in global memory) or (H_K Z) * c, in place, for every
// row of the block. A tile reads whole columns of Z and writes 4 rows of them, so the columns are
// done in rounds: every thread computes its tiles of the round into registers, then (barrier) all
// write. Rounds touch disjoint columns. The caller puts a barrier after it.
template <class L, bool kByVector>
__device__ __forceinline__ void kron_in_place(float* z, const float* __restrict__ h_k,
                                              const float* __restrict__ s, float c, int k, int nrows) {
  const int d = k * L::N, kq = k / 4, nq = L::N / 4;
  const int tiles_per_round = kKronTilesPerThread * blockDim.x;
  const int quads_per_round = cmin(nq, tiles_per_round / (nrows * kq));  // >= 1, see launcher
  for (int q0 = 0; q0 < nq; q0 += quads_per_round) {
    const int qn = cmin(quads_per_round, nq - q0);
    const int round_tiles = nrows * kq * qn;
    float4 acc[kKronTilesPerThread][4];
#pragma unroll
    for (int m = 0; m < kKronTilesPerThread; ++m) {
      const int t = threadIdx.x + m * blockDim.x;
      if (t >= round_tiles) continue;
      const Tile tl = tile_at(t, kq, qn, q0);
      kron_tile(z + tl.row * d, h_k, k, L::N, tl.kb4, tl.n4, acc[m]);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const float4 sv = kByVector ? __ldg(reinterpret_cast<const float4*>(s + (tl.kb4 + b) * L::N + tl.n4))
                                    : make_float4(c, c, c, c);
        acc[m][b] = make_float4(acc[m][b].x * sv.x, acc[m][b].y * sv.y, acc[m][b].z * sv.z,
                                acc[m][b].w * sv.w);
      }
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kKronTilesPerThread; ++m) {
      const int t = threadIdx.x + m * blockDim.x;
      if (t >= round_tiles) continue;
      const Tile tl = tile_at(t, kq, qn, q0);
#pragma unroll
      for (int b = 0; b < 4; ++b)
        *reinterpret_cast<float4*>(z + tl.row * d + (tl.kb4 + b) * L::N + tl.n4) = acc[m][b];
    }
  }
}

// Shared memory of kron_kernel in floats: the rows, then (epilogue) the partial sums of squares
// (one per (row, part) of kron_rms_store: at most max(rows, warps)) and one rstd per row, each
// rounded up to whole float4.
constexpr int kKronWarps = kKronThreads / 32;
__host__ __device__ constexpr int kron_partials(int rows_per_block) {
  return round_up4(rows_per_block > kKronWarps ? rows_per_block : kKronWarps);
}

template <Op kOp>
__host__ __device__ constexpr int kron_shared_floats(int rows_per_block, int d) {
  return rows_per_block * d +
         (kOp == Op::kAddPatchRmsNorm ? kron_partials(rows_per_block) + round_up4(rows_per_block) : 0);
}

// The rows of a kron_kernel block: about 32 KiB of them, at least one.
__host__ __device__ constexpr int kron_rows_per_block(int d) { return 8192 / d > 1 ? 8192 / d : 1; }

// The most shared memory kron_kernel needs for N = 2**log2_n over every K (multiples of 4, d <= kMaxD).
template <Op kOp>
constexpr int kron_max_shared_floats(int log2_n) {
  int most = 0;
  for (int k = 4; k <= 256 && (k << log2_n) <= kMaxD; k += 4) {
    const int floats = kron_shared_floats<kOp>(kron_rows_per_block(k << log2_n), k << log2_n);
    most = floats > most ? floats : most;
  }
  return most;
}

// The epilogue's RMSNorm of the block's rows h = Z (fp32, in shared memory, already scaled), stored
// with h to global memory. Sums of squares: the rows are split into `parts` slices so that all
// warps work when there are fewer rows than warps; warp w sums slices w, w + warps, ... in a fixed
// order (deterministic), lane by lane and then across lanes.
template <typename T, int V>
__device__ __forceinline__ void kron_rms_store(const float* z, float* partial, float* rstd, T* y,
                                               T* normed, const float* __restrict__ w, float eps,
                                               int d, int nrows) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = kKronWarps;
  int parts = 1;
  while (2 * parts * nrows <= warps) parts *= 2;  // <= 8, so that d / parts is a multiple of 4
  const int part_len = d / parts;
  for (int item = warp; item < nrows * parts; item += warps) {
    const float* p = z + (item / parts) * d + (item % parts) * part_len;
    float acc = 0.f;
    for (int j = 4 * lane; j < part_len; j += 4 * 32) {
      const float4 a = *reinterpret_cast<const float4*>(p + j);
      acc = fmaf(a.x, a.x, acc);
      acc = fmaf(a.y, a.y, acc);
      acc = fmaf(a.z, a.z, acc);
      acc = fmaf(a.w, a.w, acc);
    }
    acc = sum_over_lanes<32>(acc);
    if (lane == 0) partial[item] = acc;
  }
  __syncthreads();
  const float inv_d = 1.f / float(d);
  for (int row = threadIdx.x; row < nrows; row += blockDim.x) {
    float sum = 0.f;
    for (int part = 0; part < parts; ++part) sum += partial[row * parts + part];
    rstd[row] = rsqrtf(sum * inv_d + eps);
  }
  __syncthreads();
  for (int j = V * threadIdx.x; j < nrows * d; j += V * blockDim.x) {
    const int row = j / d;
    float h[V];
    load_f32(z + j, h);
    store_h_and_normed(y + j, normed + j, w + (j - row * d), h, rstd[row]);
  }
}

template <typename T, int kLogN, Op kOp>
__global__ void __launch_bounds__(kKronThreads)
kron_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ h_k,
            const float* __restrict__ s, int64_t rows, int k, int rows_per_block, float out_scale,
            EpilogueOperands<T> e) {
  using L = Layout<T, kLogN, kKronLogMaxValues>;
  constexpr bool kPatch = kOp != Op::kTransform;
  constexpr bool kEpilogue = kOp == Op::kAddPatchRmsNorm;
  extern __shared__ float4 smem4[];
  float* z = reinterpret_cast<float*>(smem4);
  const int d = k * L::N;
  const int64_t row0 = int64_t(blockIdx.x) * rows_per_block;
  const int nrows = int(rows - row0 < rows_per_block ? rows - row0 : rows_per_block);

  // Z = X H_N (X = x, or x + update for the epilogue), segment by segment.
  if constexpr (kEpilogue) fwht_segments<L, true>(x + row0 * d, e.update + row0 * d, z, nrows * k);
  else fwht_segments<L>(x + row0 * d, static_cast<const T*>(nullptr), z, nrows * k);
  __syncthreads();

  if constexpr (kPatch) {
    // Z <- (H_K Z) * s, then Z <- Z H_N again.
    kron_in_place<L, true>(z, h_k, s, 1.f, k, nrows);
    __syncthreads();
    fwht_segments<L>(z, static_cast<const float*>(nullptr), z, nrows * k);
    __syncthreads();
  }

  if constexpr (kEpilogue) {
    // h = (H_K Z) * out_scale stays in shared memory for the row sums, then goes out with normed.
    kron_in_place<L, false>(z, h_k, nullptr, out_scale, k, nrows);
    __syncthreads();
    float* partial = z + rows_per_block * d;
    float* rstd = partial + kron_partials(rows_per_block);
    kron_rms_store<T, L::V>(z, partial, rstd, y + row0 * d, e.normed + row0 * d, e.weight, e.eps, d, nrows);
  } else {
    // y = (H_K Z) * out_scale, straight from the tiles to global memory: a thread computes the
    // 4 x 4 tiles of 16 bytes of columns (one tile in fp32, two side by side in fp16/bf16, the first
    // packed to 16 bits before the second is computed), so each output row is one 16-byte store.
    T* yb = y + row0 * d;
    const int kq = k / 4, nv = L::N / L::V;
    const int items = nrows * kq * nv;
    for (int t = threadIdx.x; t < items; t += blockDim.x) {
      const int n0 = L::V * (t % nv), rest = t / nv, row = rest / kq, kb4 = 4 * (rest % kq);
      T* const out = yb + row * d + kb4 * L::N + n0;
      float4 acc[4];
      kron_tile(z + row * d, h_k, k, L::N, kb4, n0, acc);
      if constexpr (L::V == 4) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const float v[4] = {acc[b].x, acc[b].y, acc[b].z, acc[b].w};
          store_vec(out + b * L::N, v, out_scale);
        }
      } else {
        uint2 low[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) low[b] = pack4<T>(acc[b], out_scale);
        kron_tile(z + row * d, h_k, k, L::N, kb4, n0 + 4, acc);
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint2 high = pack4<T>(acc[b], out_scale);
          *reinterpret_cast<uint4*>(out + b * L::N) = make_uint4(low[b].x, low[b].y, high.x, high.y);
        }
      }
    }
  }
}


}  // namespace linearpatch_cuda
