// Fast Hadamard transform and LinearPatch kernels.
//
// A row x of length d = K * N (N = 2**m) is viewed row-major as a K x N matrix X; then
//     x . H_d = vec(H_K X H_N)        (H_d = H_K (x) H_N, every factor symmetric)
// H_N (Sylvester) is a fast Walsh-Hadamard transform: one butterfly (a, b) -> (a + b, a - b) per
// bit of the column index n. H_K (a +-1 Paley matrix, K a multiple of 4, K <= 256) is a small
// dense multiply over the row index k. The patch is y = x . H_d diag(s) H_d / d.
// The fused interface epilogue (Op::kAddPatchRmsNorm) is the patch of x + u, followed by RMSNorm:
//     h = (x + u) . H_d diag(s) H_d / d,    normed = h * rsqrt(sum(h^2) / d + eps) * w
// with both outputs stored (the sum of squares of a row is reduced like the butterflies: in
// registers, across lanes, across warps).
//
// Column index layout of one K-row ("segment", N contiguous elements) across the threads of a
// group of G lanes (x W warps) in kron_kernel (row_kernel and kfast_kernel have their own layouts,
// described with them); each thread holds R 16-byte vectors of V elements:
//     n = V * (r * G * W + w * G + g) + i
//         i: element in the vector   -> butterflies in registers
//         g: lane in the group       -> butterflies with warp shuffles
//         w: warp                    -> butterflies through shared memory
//         r: vector of the thread    -> butterflies in registers
// Consecutive lanes read consecutive 16-byte vectors, so every load and store is coalesced.
// Everything is computed in fp32; x and y are fp32, fp16 or bf16.
//
// Three kernels (launch_op picks one):
//  * row_kernel (K == 1, every N): registers and shared-memory transposes; no shuffles up to
//    N = 16384, one lane-shuffle stage per transform at N = 32768;
//  * kfast_kernel (K > 1 at the sizes of kfast_size): H_K as compile-time +-1 add/subtract code
//    over a shared-memory tile of rows;
//  * kron_kernel (the other K > 1): a block owns `rows_per_block` rows in shared memory (fp32). H_N
//    runs per segment in registers as above; H_K runs as 4 x 4 output tiles read from shared memory.
// Each is instantiated per operator (Op); hadamard_*.cu hold transform and patch, and
// patch_add_rmsnorm_*.cu the epilogue, so that they compile in parallel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "hadamard_launch.h"

namespace linearpatch_cuda {

// What a kernel instance computes.
enum class Op {
  kTransform,        // y = x . H_d * out_scale
  kPatch,            // y = x . H_d diag(s) H_d * out_scale (out_scale = 1/d)
  kAddPatchRmsNorm,  // the patch of x + update, and normed = RMSNorm(y) * weight
};

// The extra operands of Op::kAddPatchRmsNorm (null for the other operators).
template <typename T>
struct EpilogueOperands {
  const T* update;      // (rows, d) like x: added to x as it is loaded, in fp32
  T* normed;            // (rows, d) like y
  const float* weight;  // (d,) fp32 norm weight
  float eps;
};

// ---------------------------------------------------------------------------------------------
// 16-byte vectors <-> fp32 registers

template <typename T>
struct VecTraits {
  static constexpr int kLog = sizeof(T) == 4 ? 2 : 3;  // 4 fp32 or 8 fp16/bf16 per 16 bytes
  static constexpr int kSize = 1 << kLog;
};

__device__ __forceinline__ void load_vec(const float* p, float (&v)[4]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}

// 16 bytes as loaded (8 fp16 or bf16 values) -> fp32; the pointer type only picks the format.
__device__ __forceinline__ void unpack_vec(const uint4 raw, const __half*, float (&v)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    v[2 * j] = f.x; v[2 * j + 1] = f.y;
  }
}

__device__ __forceinline__ void unpack_vec(const uint4 raw, const __nv_bfloat16*, float (&v)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(h[j]);
    v[2 * j] = f.x; v[2 * j + 1] = f.y;
  }
}

__device__ __forceinline__ void load_vec(const __half* p, float (&v)[8]) {
  unpack_vec(*reinterpret_cast<const uint4*>(p), p, v);
}

__device__ __forceinline__ void load_vec(const __nv_bfloat16* p, float (&v)[8]) {
  unpack_vec(*reinterpret_cast<const uint4*>(p), p, v);
}

// 16-byte global stores. __stwb (st.global.wb.v4, the default write-back policy) rather than a
// plain vector assignment: in kfast_kernel at N = 16..64 nvcc split such assignments into four
// 4-byte st.global (the SASS budget showed STG.E where STG.E.128 was meant).
__device__ __forceinline__ void store_vec(float* p, const float (&v)[4], float c) {
  __stwb(reinterpret_cast<float4*>(p), make_float4(v[0] * c, v[1] * c, v[2] * c, v[3] * c));
}

__device__ __forceinline__ void store_vec(__half* p, const float (&v)[8], float c) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(v[2 * j] * c, v[2 * j + 1] * c);
  __stwb(reinterpret_cast<uint4*>(p), raw);
}

__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float (&v)[8], float c) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j] * c, v[2 * j + 1] * c);
  __stwb(reinterpret_cast<uint4*>(p), raw);
}

// fp32 data (shared memory, the patch scales) in the vector layout of the I/O dtype.
template <int V>
__device__ __forceinline__ void load_f32(const float* p, float (&v)[V]) {
#pragma unroll
  for (int j = 0; j < V / 4; ++j) {
    const float4 a = reinterpret_cast<const float4*>(p)[j];
    v[4 * j] = a.x; v[4 * j + 1] = a.y; v[4 * j + 2] = a.z; v[4 * j + 3] = a.w;
  }
}

template <int V>
__device__ __forceinline__ void store_f32(float* p, const float (&v)[V]) {
#pragma unroll
  for (int j = 0; j < V / 4; ++j)
    reinterpret_cast<float4*>(p)[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
}

// Four fp32 values, times c, as four fp16/bf16 in 8 bytes.
template <typename T>
__device__ __forceinline__ uint2 pack4(float4 a, float c) {
  uint2 raw;
  if constexpr (sizeof(T) == 2 && std::is_same<T, __half>::value) {
    reinterpret_cast<__half2*>(&raw)[0] = __floats2half2_rn(a.x * c, a.y * c);
    reinterpret_cast<__half2*>(&raw)[1] = __floats2half2_rn(a.z * c, a.w * c);
  } else {
    reinterpret_cast<__nv_bfloat162*>(&raw)[0] = __floats2bfloat162_rn(a.x * c, a.y * c);
    reinterpret_cast<__nv_bfloat162*>(&raw)[1] = __floats2bfloat162_rn(a.z * c, a.w * c);
  }
  return raw;
}

// ---------------------------------------------------------------------------------------------
// How a segment of N = 2**kLogN elements is spread over a thread group (see the header comment).
// Lanes of a group cover at least 8 consecutive 16-byte vectors (128 contiguous bytes) when the
// segment is that long; each thread then takes up to 2**kLogMaxValues values; lanes grow to a full
// warp next, and only then warps. Fewer lanes means fewer shuffle stages.
// kron_kernel takes up to 64 values per thread (it also holds H_K tiles and keeps whole rows in
// shared memory, so registers are what limits its blocks per multiprocessor), and its segments
// (N <= 2048) fit in one warp.

__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }

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

// ---------------------------------------------------------------------------------------------
// Butterflies

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

// ---------------------------------------------------------------------------------------------
// Row sums for the RMSNorm of the epilogue

// Sum over the aligned group of G lanes that holds a row, the shuffle pattern of the butterflies.
// Lanes l and l ^ h add the same two numbers (a + b == b + a), so every lane of the group ends with
// the bit-identical total.
template <int G>
__device__ __forceinline__ float sum_over_lanes(float v) {
#pragma unroll
  for (int h = 1; h < G; h <<= 1) v += __shfl_xor_sync(0xffffffffu, v, h);
  return v;
}

// The epilogue's store: y = h (already scaled), normed = h * rstd * w; w is fp32 in y's layout.
template <typename T, int V>
__device__ __forceinline__ void store_h_and_normed(T* y, T* normed, const float* w, const float (&h)[V],
                                                   float rstd) {
  float n[V];
  load_f32(w, n);
#pragma unroll
  for (int i = 0; i < V; ++i) n[i] = h[i] * rstd * n[i];
  store_vec(y, h, 1.f);
  store_vec(normed, n, 1.f);
}

// ---------------------------------------------------------------------------------------------
// K == 1 (row_kernel): butterflies in registers, bits exchanged through shared-memory transposes.
//
// The T = 2**kLogT threads of a row hold 2**kLogR values each (kLogT + kLogR = kLogN, kLogR >= kLogT
// up to N = 16384, where T = 128 threads, one block, own a row; at most 128 values per thread). At
// N = 32768 T = 256 = 2 R, and one bit of B (the "split" bit) stays a thread bit in L1: lane bit 0,
// one __shfl_xor_sync stage per transform (1/15 of the butterflies) instead of a third layout. The column index n of value j of thread t has two layouts
// (V = 2**v elements per 16-byte vector, j = jt * V + jv):
//   L0, global I/O:  n = jv | t << v | jt << (v + kLogT)
//       registers own the bits A = [0, v) u [v + kLogT, kLogN), threads own B = [v, v + kLogT);
//   L1:  registers own A's lowest kLogE = kLogR - kLogT bits (the low bits of j: 0 or 1 bit from
//       N = 32 up, so L1 moves 4- or 8-byte vectors) and B (the next kLogT bits of j); threads own
//       the rest of A.
// A transform is the butterflies over A in L0, a transpose, the butterflies over B in L1. The stages
// commute, so the patch x H diag(s) H / d starts its second transform where the first ended:
//   A (L0) -> transpose -> B, * s/d, B (L1) -> transpose -> A (L0) -> store
// two transposes per patch, as for the transform (which goes back to L0 to store 16-byte vectors).
// s/d is staged once per block in shared memory in L1 order (the norm weight of the epilogue in L0
// order), as float4 planes: plane q of thread t at float4 q * T + t, conflict-free. From N = 16384 s
// (64 KiB) and a row's buffer (72 KiB in fp16/bf16) would leave one block per SM, so s is read per
// row in L1 order through the cache instead, and 1/d is applied at the store. A load instruction reads
// whole 32-byte sectors in fp16/bf16 (8 threads on 8 consecutive floats) and half sectors in fp32 (4
// threads; the other half comes one register later). With 3 blocks' buffers in shared memory, 64 KiB
// of s hardly stays in L1: expect it from L2, 4 bytes per element beside the 4 (bf16) of HBM traffic;
// the SASS model does not charge it to any pipe.
//
// Shared-memory word of n: word(n) = n + c1 (n >> s1) + c2 (n >> s2). It is strictly increasing (so
// one-to-one) and additive over disjoint bit patterns, so word(thread part | register part) is a
// per-thread base plus a compile-time offset: every transpose access is one instruction with an
// immediate offset. The padding makes both sides conflict-free: the 16-byte L0 accesses (a quarter
// warp covers n bits v, v+1, v+2: words 2**v, 2**(v+1), 2**(v+2) + c1) and the 4-byte L1 accesses
// (a warp's 4- or 8-byte accesses cover A's bits from kLogE up, and at N = 32768 the split bit, whose
// words are 2**kLogE, ..., 16 mod 32 by the choice of c2).

__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }

template <typename Elem, int kLogN_>
struct RowLayout {
  static constexpr int kLogN = kLogN_;
  static constexpr int kLogV = VecTraits<Elem>::kLog;
  static constexpr int kLogR = cmin(7, cmax(kLogV, (kLogN + 1) / 2));  // at most 128 values per thread
  static constexpr int kLogT = kLogN - kLogR;
  static constexpr int N = 1 << kLogN, V = 1 << kLogV, R = 1 << kLogR, T = 1 << kLogT;
  // N = 32768: 256 threads own 8 bits of B, one more than the 128 L1 registers can hold. The top bit
  // of B then stays a thread bit in L1, on lane bit 0, and is exchanged with a lane shuffle.
  static constexpr bool kSplit = kLogT == kLogR + 1;
  static_assert(kLogN >= kLogV && (kLogT <= kLogR || kSplit), "the L1 registers must hold the thread bits of L0 but one");
  static constexpr int kHigh = kLogV + kLogT;  // lowest bit of A above B

  // n of register j with thread 0, and of thread t with register 0 (the two parts are disjoint bits).
  static __host__ __device__ constexpr int l0_reg(int j) { return (j & (V - 1)) | ((j >> kLogV) << kHigh); }
  static __host__ __device__ constexpr int l0_thread(int t) { return t << kLogV; }
  // Bits of x placed on A's bits from its `first`-lowest one up. A = [0, kLogV) u [kHigh, kLogN): the
  // bits of x << first below kLogV stay, the others move up by kHigh - kLogV (no loop: the staging of
  // s computes this per element).
  static __host__ __device__ constexpr int deposit_a(int x, int first) {
    return ((x << first) & (V - 1)) | (((x << first) >> kLogV) << kHigh);
  }
  // L1: the low kLogE bits of j are A's lowest bits (contiguous n), so L1 moves vectors of
  // min(2**kLogE, 4) floats through shared memory; the next kL1B bits of j are B (all of B but the
  // split bit).
  static constexpr int kLogE = kSplit ? 0 : kLogR - kLogT;
  static constexpr int kL1B = kSplit ? kLogR : kLogT;
  static constexpr int kL1Vec = kLogE >= 2 ? 4 : 1 << kLogE;
  static __host__ __device__ constexpr int l1_reg(int j) {
    return deposit_a(j & ((1 << kLogE) - 1), 0) | (((j >> kLogE) & ((1 << kL1B) - 1)) << kLogV);
  }
  static __host__ __device__ constexpr int l1_thread(int t) {
    return kSplit ? ((t & 1) << (kLogV + kL1B)) | deposit_a(t >> 1, 0) : deposit_a(t, kLogE);
  }

  // Padding: the lowest thread bit of L1 outside [0, kLogV) is bit kS2 (A's bit kHigh, or the split
  // bit of B); c2 puts its word at V mod 32, the next ones at 2V, 4V (16 mod 32 for fp16/bf16).
  static constexpr int kS1 = kLogV + 2, kC1 = kLogV == 3 ? 4 : 0;
  static constexpr int kS2 = kLogV + kL1B;
  static __host__ __device__ constexpr int word_c1(int n) { return n + kC1 * (n >> kS1); }
  static constexpr int kC2 = ((1 << kLogV) - word_c1(1 << kS2)) & 31;
  static __host__ __device__ constexpr int word(int n) { return word_c1(n) + kC2 * (n >> kS2); }
  static constexpr int kBufferFloats = (word(N - 1) + 4) / 4 * 4;  // one row, whole float4
};

// Butterflies over bits [kFirst, kLast) of the register index.
template <int kFirst, int kLast, int R>
__device__ __forceinline__ void butterflies_over(float (&v)[R]) {
#pragma unroll
  for (int b = kFirst; b < kLast; ++b) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if (i & (1 << b)) continue;
      const float a = v[i], c = v[i + (1 << b)];
      v[i] = a + c;
      v[i + (1 << b)] = a - c;
    }
  }
}

// Shared memory <-> registers in vectors of W = 1, 2 or 4 floats.
template <int W>
__device__ __forceinline__ void shared_to_registers(const float* p, float* v) {
  if constexpr (W == 4) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  } else if constexpr (W == 2) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x; v[1] = a.y;
  } else {
    v[0] = *p;
  }
}

template <int W>
__device__ __forceinline__ void registers_to_shared(const float* v, float* p) {
  if constexpr (W == 4) *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  else if constexpr (W == 2) *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  else *p = v[0];
}

// Lanes l and l ^ 1 exchange every value: the even lane keeps a + b, the odd one a - b, i.e.
// new = other + sign * mine with sign = -1 on the odd lane (exact, like the additions above).
template <int R>
__device__ __forceinline__ void butterflies_across_lane_bit0(float (&v)[R]) {
  const float sign = (threadIdx.x & 1) ? -1.f : 1.f;
#pragma unroll
  for (int j = 0; j < R; ++j) v[j] = fmaf(sign, v[j], __shfl_xor_sync(0xffffffffu, v[j], 1));
}

template <int V, int R>
__device__ __forceinline__ float (&vec_at(float (&v)[R], int jt))[V] {
  return *reinterpret_cast<float(*)[V]>(&v[jt * V]);
}

constexpr int kRowThreads = 128;  // 64 where two rows of shared memory do not fit (N = 8192 on sm_86/89)
constexpr int kMaxRowLog2N = 15;  // N = 32768: 128 values per thread, 256 threads per row

// Threads per block: kRowThreads, or one row's T where that is more (N = 32768).
template <class L>
__host__ __device__ constexpr int row_block_threads() { return cmax(kRowThreads, L::T); }
constexpr int kRowPartials = 8;  // the epilogue's per-warp sums: up to 8 warps per block
constexpr int kRowStageBatch = 16;  // loads in flight per thread while row_kernel stages s (and the norm weight)

// The epilogue keeps the norm weight in shared memory up to N = 4096; at 8192 it is read through the
// L1 cache instead (16-byte loads in L0 order), so that a block fits in every sm_80+ GPU.
template <class L, Op kOp>
__host__ __device__ constexpr bool row_stages_weight() { return kOp == Op::kAddPatchRmsNorm && L::kLogN <= 12; }

// s/d in shared memory up to N = 8192; from 16384 s is read through the L1 cache (see above).
template <class L, Op kOp>
__host__ __device__ constexpr bool row_stages_s() { return kOp != Op::kTransform && L::kLogN <= 13; }

// Shared memory of row_kernel: s/d, the norm weight, the epilogue's per-warp sums, a transpose buffer per row.
template <class L, Op kOp>
__host__ __device__ constexpr int row_shared_floats(int threads) {
  return (row_stages_s<L, kOp>() ? L::N : 0) + (row_stages_weight<L, kOp>() ? L::N : 0) +
         (kOp == Op::kAddPatchRmsNorm ? kRowPartials : 0) + threads / L::T * L::kBufferFloats;
}

// Software pipelining in row_kernel: the next row's 16-byte vectors are loaded as they are (no
// conversion) while this row is computed, so that their memory latency overlaps this row's work
// instead of stalling the warp at the top of the loop. It costs 32 registers per tensor (fp16/bf16,
// 8 vectors per thread; 64 at N = 32768), so it is used only where shared memory, not registers,
// bounds the resident blocks: the patch at N = 2048 and 4096 (4 blocks of 128 threads per SM on sm_90,
// so at most 128 registers), the epilogue at 4096 (3 blocks, at most 170 registers), and the transform
// and patch at 32768 (one block of 256 threads per SM: 254 registers, no spills); row_min_blocks makes
// the compiler keep to those counts. Elsewhere (the transform below 32768, N <= 1024, the epilogue at
// 2048, everything at 16384) it would cost resident warps; which wins there is for a GPU to say.
template <class L, Op kOp>
__host__ __device__ constexpr bool row_prefetches() {
  return L::V == 8 && ((L::R / L::V <= 8 && ((kOp == Op::kPatch && L::kLogN >= 11) ||
                                              (kOp == Op::kAddPatchRmsNorm && L::kLogN == 12))) ||
                       (kOp != Op::kAddPatchRmsNorm && L::kLogN == 15));
}

template <class L, Op kOp>
__host__ __device__ constexpr int row_min_blocks() {
  // N = 16384: shared memory holds 3 blocks (one row each) on sm_90; the epilogue would spill in 170
  // registers, so it keeps 2.
  if (L::kLogN == 14) return kOp == Op::kAddPatchRmsNorm ? 2 : 3;
  if (L::kLogN == 15) return 1;  // one block of 256 threads per SM (145 KiB of shared memory in fp16/bf16)
  return !row_prefetches<L, kOp>() ? 1 : kOp == Op::kPatch ? 4 : 3;
}

// Persistent: the grid covers the multiprocessors once (see launch_rows); each block stages s (and
// the norm weight) once and then loops over groups of blockDim.x / T rows.
template <typename T, int kLogN, Op kOp>
__global__ void __launch_bounds__(row_block_threads<RowLayout<T, kLogN>>(), row_min_blocks<RowLayout<T, kLogN>, kOp>())
row_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ s, int64_t rows,
           float out_scale, EpilogueOperands<T> e) {
  using L = RowLayout<T, kLogN>;
  constexpr bool kPatch = kOp != Op::kTransform;
  constexpr bool kEpilogue = kOp == Op::kAddPatchRmsNorm;
  constexpr bool kStageWeight = row_stages_weight<L, kOp>();
  constexpr bool kStageS = row_stages_s<L, kOp>();
  const int rows_per_iter = blockDim.x >> L::kLogT;
  extern __shared__ float4 smem4[];
  float* const s_l1 = reinterpret_cast<float*>(smem4);
  float* const w_l0 = s_l1 + (kStageS ? L::N : 0);
  float* const partials = w_l0 + (kStageWeight ? L::N : 0);
  float* const buffers = partials + (kEpilogue ? kRowPartials : 0);
  const int slot = threadIdx.x >> L::kLogT, t = threadIdx.x & (L::T - 1);
  float* const buf = buffers + slot * L::kBufferFloats;
  // A row's threads are one aligned group of lanes (T <= 32) or whole warps: two (T = 64, the block
  // one or two rows), four or eight (T = 128, 256: the block is one row).
  auto sync_row = [] {
    if constexpr (L::T > 32) __syncthreads();
    else __syncwarp();
  };

  if constexpr (kStageS) {
    // A gather of N values, N / blockDim.x per thread (32 at N = 4096): loaded in batches of
    // kRowStageBatch independent loads before any is stored, so that a thread waits for one memory
    // round trip per batch instead of one per value (before: ~16 us per block on an H200, inferred
    // from a one-row patch taking 21.1 us against the transform's 4.8 us).
    for (int first = 0; first < L::N; first += kRowStageBatch * blockDim.x) {  // the same trip count for every thread
      float sv[kRowStageBatch], wv[kRowStageBatch];
#pragma unroll
      for (int b = 0; b < kRowStageBatch; ++b) {
        const int i = first + b * blockDim.x + threadIdx.x;
        if (i < L::N) {
          const int q = i >> (2 + L::kLogT), tt = (i >> 2) & (L::T - 1), j = 4 * q + (i & 3);
          sv[b] = __ldg(s + (L::l1_thread(tt) | L::l1_reg(j)));
          if constexpr (kStageWeight) wv[b] = __ldg(e.weight + (L::l0_thread(tt) | L::l0_reg(j)));
        }
      }
      // Keeps the compiler from moving the first stores (which wait for their loads) above the last loads.
      __syncwarp();
#pragma unroll
      for (int b = 0; b < kRowStageBatch; ++b) {
        const int i = first + b * blockDim.x + threadIdx.x;
        if (i < L::N) {
          s_l1[i] = sv[b] * out_scale;  // out_scale = 1/d
          if constexpr (kStageWeight) w_l0[i] = wv[b];
        }
      }
    }
    __syncthreads();
  }
  const float4* const s4 = reinterpret_cast<const float4*>(s_l1) + t;
  const float* const s1 = kPatch ? s + L::l1_thread(t) : s;  // N >= 16384: s in L1 order through the cache
  const float4* const w4 = reinterpret_cast<const float4*>(w_l0) + t;
  const int g0 = L::l0_thread(t), w0 = L::word(g0), w1 = L::word(L::l1_thread(t));
  // 1/d: folded into the staged s/d, else applied at the store (the epilogue: before the sum of squares).
  const float s_scale = kPatch && !kStageS ? out_scale : 1.f;
  const int64_t step = int64_t(gridDim.x) * rows_per_iter;

  constexpr bool kPrefetch = row_prefetches<L, kOp>();
  uint4 ahead[kPrefetch ? L::R / L::V : 1], ahead_u[kPrefetch && kEpilogue ? L::R / L::V : 1];
  auto load_ahead = [&](int64_t r) {
    if constexpr (kPrefetch) {
      if (r < rows) {
#pragma unroll
        for (int jt = 0; jt < L::R / L::V; ++jt) {
          ahead[jt] = *reinterpret_cast<const uint4*>(x + r * L::N + g0 + L::l0_reg(jt * L::V));
          if constexpr (kEpilogue)
            ahead_u[jt] = *reinterpret_cast<const uint4*>(e.update + r * L::N + g0 + L::l0_reg(jt * L::V));
        }
      }
    }
  };
  if constexpr (kPrefetch) load_ahead(int64_t(blockIdx.x) * rows_per_iter + slot);

  for (int64_t base = int64_t(blockIdx.x) * rows_per_iter; base < rows; base += step) {
    const int64_t row = base + slot;
    const bool active = row < rows;  // idle rows of the last group compute on zeros, store nothing
    float v[L::R];
#pragma unroll
    for (int jt = 0; jt < L::R / L::V; ++jt) {
      float(&vj)[L::V] = vec_at<L::V>(v, jt);
      if constexpr (kPrefetch) {
        if (active) {
          unpack_vec(ahead[jt], x, vj);
          if constexpr (kEpilogue) {
            float u[L::V];
            unpack_vec(ahead_u[jt], x, u);
#pragma unroll
            for (int i = 0; i < L::V; ++i) vj[i] += u[i];
          }
        } else {
#pragma unroll
          for (int i = 0; i < L::V; ++i) vj[i] = 0.f;
        }
        continue;
      }
      if (active) {
        load_vec(x + row * L::N + g0 + L::l0_reg(jt * L::V), vj);
        if constexpr (kEpilogue) {
          float u[L::V];
          load_vec(e.update + row * L::N + g0 + L::l0_reg(jt * L::V), u);
#pragma unroll
          for (int i = 0; i < L::V; ++i) vj[i] += u[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < L::V; ++i) vj[i] = 0.f;
      }
    }
    if constexpr (kPrefetch) load_ahead(row + step);
    butterflies_over<0, L::kLogR>(v);  // A, first transform

    if constexpr (L::kLogT > 0) {
#pragma unroll
      for (int q = 0; q < L::R / 4; ++q)
        *reinterpret_cast<float4*>(buf + w0 + L::word(L::l0_reg(4 * q))) =
            make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
      sync_row();
#pragma unroll
      for (int j = 0; j < L::R; j += L::kL1Vec) shared_to_registers<L::kL1Vec>(buf + w1 + L::word(L::l1_reg(j)), &v[j]);
      butterflies_over<L::kLogE, L::kLogR>(v);  // B, first transform
      if constexpr (L::kSplit) butterflies_across_lane_bit0(v);  // B's split bit
    }
    if constexpr (kStageS) {
#pragma unroll
      for (int q = 0; q < L::R / 4; ++q) {
        const float4 sv = s4[q * L::T];
        v[4 * q] *= sv.x; v[4 * q + 1] *= sv.y; v[4 * q + 2] *= sv.z; v[4 * q + 3] *= sv.w;
      }
    } else if constexpr (kPatch) {
#pragma unroll
      for (int j = 0; j < L::R; ++j) v[j] *= __ldg(s1 + L::l1_reg(j));
    }
    if constexpr (kPatch) {
      if constexpr (L::kSplit) butterflies_across_lane_bit0(v);
      butterflies_over<L::kLogE, L::kLogR>(v);  // B, second transform (empty when T == 1)
    }
    // Two barriers per row, not four: a thread writes back exactly the L1 words it read (no other
    // thread reads them between the barriers), and reads back in L0 exactly the words it wrote at the
    // top of the loop, so neither the L1 write-back nor the next row's L0 writes need to wait for the
    // others. (The epilogue's partials are rewritten only after the next row's two barriers.)
    if constexpr (L::kLogT > 0) {
#pragma unroll
      for (int j = 0; j < L::R; j += L::kL1Vec) registers_to_shared<L::kL1Vec>(&v[j], buf + w1 + L::word(L::l1_reg(j)));
      sync_row();
#pragma unroll
      for (int q = 0; q < L::R / 4; ++q) {
        const float4 a = *reinterpret_cast<const float4*>(buf + w0 + L::word(L::l0_reg(4 * q)));
        v[4 * q] = a.x; v[4 * q + 1] = a.y; v[4 * q + 2] = a.z; v[4 * q + 3] = a.w;
      }
    }
    if constexpr (kPatch) butterflies_over<0, L::kLogR>(v);  // A, second transform

    T* const yr = y + row * L::N + g0;
    if constexpr (kEpilogue) {
      if constexpr (!kStageS) {
#pragma unroll
        for (int j = 0; j < L::R; ++j) v[j] *= s_scale;
      }
      // h = v (1/d applied); the row's sum of h^2 over its registers, its lanes, its warps.
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < L::R; ++j) sum = fmaf(v[j], v[j], sum);
      sum = sum_over_lanes<(L::T < 32 ? L::T : 32)>(sum);
      if constexpr (L::T > 32) {
        constexpr int kWarps = L::T / 32;  // of the row
        if ((threadIdx.x & 31) == 0) partials[threadIdx.x >> 5] = sum;
        __syncthreads();
        sum = 0.f;
#pragma unroll
        for (int i = 0; i < kWarps; ++i) sum += partials[kWarps * slot + i];  // a fixed order
      }
      const float rstd = rsqrtf(sum * (1.f / L::N) + e.eps);
      if (active) {
        T* const nr = e.normed + row * L::N + g0;
#pragma unroll
        for (int jt = 0; jt < L::R / L::V; ++jt) {
          float n[L::V];
#pragma unroll
          for (int q = 0; q < L::V / 4; ++q) {
            const float4 w = kStageWeight ? w4[(jt * L::V / 4 + q) * L::T]
                                          : __ldg(reinterpret_cast<const float4*>(e.weight + g0 + L::l0_reg(jt * L::V)) + q);
            const float* h = &v[jt * L::V + 4 * q];
            n[4 * q] = h[0] * rstd * w.x; n[4 * q + 1] = h[1] * rstd * w.y;
            n[4 * q + 2] = h[2] * rstd * w.z; n[4 * q + 3] = h[3] * rstd * w.w;
          }
          store_vec(yr + L::l0_reg(jt * L::V), vec_at<L::V>(v, jt), 1.f);
          store_vec(nr + L::l0_reg(jt * L::V), n, 1.f);
        }
      }
    } else if (active) {
#pragma unroll
      for (int jt = 0; jt < L::R / L::V; ++jt)
        store_vec(yr + L::l0_reg(jt * L::V), vec_at<L::V>(v, jt), kPatch ? s_scale : out_scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
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
__host__ __device__ constexpr int round_up4(int n) { return (n + 3) / 4 * 4; }
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

// ---------------------------------------------------------------------------------------------
// K > 1 at the hidden sizes of real models (kfast_kernel): H_K as generated +-1 add/subtract code.
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
// The other (K, N) pairs use kron_kernel.

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

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

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

// ---------------------------------------------------------------------------------------------
// Host side

inline std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// Block size and dynamic shared memory of a launch.
struct LaunchShape {
  int threads;
  size_t smem;
};

// What a kernel instance needs once per device: the first of its candidate shapes whose shared memory
// the device allows, the opt-in for it, and how many such blocks the device holds at once (the
// persistent grid of row_kernel).
struct KernelSetup {
  LaunchShape shape{0, 0};
  int64_t resident_blocks = 0;
};

template <typename Kernel>
std::string setup_kernel(Kernel kernel, const LaunchShape* shapes, int count, int device, KernelSetup& setup) {
  int limit = 0, sms = 0, per_sm = 0;
  cudaError_t e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", e);
  int pick = 0;
  while (pick + 1 < count && shapes[pick].smem > size_t(limit)) ++pick;
  LaunchShape shape = shapes[pick];
  // A shape beyond the device's limit opts into the limit: launches that need less still run, the
  // launcher reports the others (check_shared_memory).
  if (shape.smem > size_t(limit)) shape.smem = size_t(limit);
  if (shape.smem > 48 * 1024) {  // beyond 48 KiB must be opted into per kernel
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shape.smem));
    if (e != cudaSuccess) return cuda_error("cudaFuncSetAttribute", e);
  }
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, shape.threads, shape.smem);
  if (e != cudaSuccess) return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", e);
  setup.shape = shape;
  setup.resident_blocks = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  return {};
}

// Whether a launch's shared memory is within what its kernel was set up for.
inline std::string check_shared_memory(size_t bytes, const KernelSetup& setup) {
  if (bytes <= setup.shape.smem || bytes <= 48 * 1024) return {};
  return "needs " + std::to_string(bytes) + " bytes of shared memory per block, the device allows " +
         std::to_string(setup.shape.smem);
}

// setup_kernel once per (kernel instance, device); a failure is not cached (it is reported and the
// next call tries again).
template <typename Kernel>
std::string cached_setup(Kernel kernel, const LaunchShape* shapes, int count, int device, KernelSetup& setup) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, KernelSetup> done;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = done.find(key);
  if (it != done.end()) {
    setup = it->second;
    return {};
  }
  std::string err = setup_kernel(kernel, shapes, count, device, setup);
  if (err.empty()) done.emplace(key, setup);
  return err;
}

// cudaGetLastError returns (and clears) the last error of any earlier call on this thread, so it is
// read before the launch too: an unrelated earlier failure is reported as such, not as this kernel's.
inline std::string pending_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : cuda_error("CUDA error pending from an earlier call, before this launch", e);
}

inline std::string launch_error(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : cuda_error((std::string(kernel) + " launch").c_str(), e);
}

template <typename T>
EpilogueOperands<T> epilogue_operands(const HadamardArgs& a) {
  return EpilogueOperands<T>{static_cast<const T*>(a.update), static_cast<T*>(a.normed), a.norm_weight, a.eps};
}

template <typename T, int kLogN, Op kOp>
std::string launch_rows(const HadamardArgs& a) {
  using L = RowLayout<T, kLogN>;
  auto kernel = row_kernel<T, kLogN, kOp>;
  // 128 threads (256 at N = 32768), or 64 where that block's shared memory exceeds the device's limit
  // and a row has at most 64 threads.
  constexpr int threads = row_block_threads<L>();
  const LaunchShape shapes[2] = {{threads, sizeof(float) * size_t(row_shared_floats<L, kOp>(threads))},
                                 {kRowThreads / 2, sizeof(float) * size_t(row_shared_floats<L, kOp>(kRowThreads / 2))}};
  KernelSetup setup;
  std::string err = cached_setup(kernel, shapes, L::T <= kRowThreads / 2 ? 2 : 1, a.device, setup);
  const size_t smem = sizeof(float) * size_t(row_shared_floats<L, kOp>(setup.shape.threads));
  if (err.empty()) err = check_shared_memory(smem, setup);
  if (err.empty()) err = pending_error();
  if (!err.empty()) return err;
  const int64_t rows_per_iter = setup.shape.threads / L::T;
  const int64_t groups = (a.rows + rows_per_iter - 1) / rows_per_iter;
  const int64_t blocks = groups < setup.resident_blocks ? groups : setup.resident_blocks;
  kernel<<<unsigned(blocks), setup.shape.threads, smem, static_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.y), a.scale, a.rows, a.out_scale, epilogue_operands<T>(a));
  return launch_error("hadamard row_kernel");
}

template <typename T, int kLogN, Op kOp>
std::string launch_kron(const HadamardArgs& a) {
  using L = Layout<T, kLogN, kKronLogMaxValues>;
  const int d = a.k * L::N;
  // About 32 KiB of rows per block (at least one row), never more rows than there are.
  const int64_t max_rows_per_block = kron_rows_per_block(d);
  const int64_t rows_per_block = max_rows_per_block < a.rows ? max_rows_per_block : a.rows;
  // A patch tile round must hold all K/4 row quads of at least one column quad of every row.
  if (rows_per_block * (a.k / 4) > int64_t(kKronTilesPerThread) * kKronThreads) {
    return "K too large for the tile rounds";
  }
  const int64_t blocks = (a.rows + rows_per_block - 1) / rows_per_block;
  if (blocks > int64_t(INT32_MAX)) return "too many rows for one launch";
  const size_t smem = sizeof(float) * size_t(kron_shared_floats<kOp>(int(rows_per_block), d));
  // One kernel instance serves every K with this N: it opts into the most any of them needs.
  constexpr size_t max_smem = sizeof(float) * size_t(kron_max_shared_floats<kOp>(kLogN));
  auto kernel = kron_kernel<T, kLogN, kOp>;
  KernelSetup setup;
  const LaunchShape shape{kKronThreads, max_smem};
  std::string err = cached_setup(kernel, &shape, 1, a.device, setup);
  if (err.empty()) err = check_shared_memory(smem, setup);
  if (err.empty()) err = pending_error();
  if (!err.empty()) return err;
  kernel<<<unsigned(blocks), kKronThreads, smem, static_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.y), a.h_k, a.scale, a.rows, a.k,
      int(rows_per_block), a.out_scale, epilogue_operands<T>(a));
  return launch_error("hadamard kron_kernel");
}

template <typename T, int K, int kLogN, Op kOp>
std::string launch_kfast(const HadamardArgs& a) {
  using L = FastLayout<T, K, kLogN>;
  auto kernel = kfast_kernel<T, K, kLogN, kOp>;
  constexpr size_t smem = sizeof(float) * size_t(kfast_shared_floats<L, kOp>());
  const LaunchShape shape{kFastThreads, smem};
  KernelSetup setup;
  std::string err = cached_setup(kernel, &shape, 1, a.device, setup);
  if (err.empty()) err = check_shared_memory(smem, setup);
  if (err.empty()) err = pending_error();
  if (!err.empty()) return err;
  const int64_t tiles = (a.rows + L::P - 1) / L::P;
  const int64_t blocks = tiles < setup.resident_blocks ? tiles : setup.resident_blocks;
  kernel<<<unsigned(blocks), kFastThreads, smem, static_cast<cudaStream_t>(a.stream)>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.y), a.scale, a.rows, a.out_scale, epilogue_operands<T>(a));
  return launch_error("hadamard kfast_kernel");
}

// kfast_kernel<T, K, kLogN> when (a.k, kLogN) is one of its sizes: sets `err` and returns true.
template <typename T, int kLogN, Op kOp, int... Ks>
bool launch_kfast_if_compiled(const HadamardArgs& a, std::string& err) {
  bool launched = false;
  auto one = [&](auto k_constant) {
    constexpr int K = decltype(k_constant)::value;
    if constexpr (kfast_size<kOp>(K, kLogN)) {
      if (!launched && a.k == K) {
        err = launch_kfast<T, K, kLogN, kOp>(a);
        launched = true;
      }
    }
  };
  (one(std::integral_constant<int, Ks>{}), ...);
  return launched;
}

template <typename T, int kLogN, Op kOp>
std::string launch_op(const HadamardArgs& a) {
  if (a.k > 1) {
    std::string err;
    if (launch_kfast_if_compiled<T, kLogN, kOp, 12, 20, 28, 36, 60, 84>(a, err)) return err;
  }
  if (a.k == 1) {
    static_assert(kLogN <= kMaxRowLog2N, "row_kernel covers every K = 1 size");
    return launch_rows<T, kLogN, kOp>(a);
  }
  if constexpr (kLogN <= 11) {  // K >= 12 and d <= 32768 leave N <= 2048
    return launch_kron<T, kLogN, kOp>(a);
  }
  return "K > 1 with N > 2048 exceeds the largest supported size";
}

// kEpilogue: the fused epilogue; else the transform (a.scale == nullptr) or the patch.
template <typename T, int kLogN, bool kEpilogue>
std::string launch_for_size(const HadamardArgs& a) {
  if constexpr (kEpilogue) {
    return launch_op<T, kLogN, Op::kAddPatchRmsNorm>(a);
  } else {  // discarded in the epilogue's instantiation: one set of kernels per .cu file
    return a.scale != nullptr ? launch_op<T, kLogN, Op::kPatch>(a) : launch_op<T, kLogN, Op::kTransform>(a);
  }
}

template <typename T, bool kEpilogue>
std::string launch_typed(const HadamardArgs& a) {
  if (a.rows == 0) return {};
  if (a.k < 1 || (a.k > 1 && a.k % 4 != 0) || a.k > 256) return "K must be 1 or a multiple of 4 up to 256";
  if (int64_t(a.k) << a.log2_n > kMaxD) return "d > " + std::to_string(kMaxD) + " is not compiled";
  if (kEpilogue && (a.scale == nullptr || a.update == nullptr || a.normed == nullptr || a.norm_weight == nullptr)) {
    return "the epilogue needs scale, update, normed and norm_weight";
  }
  switch (a.log2_n) {
    case 3: return launch_for_size<T, 3, kEpilogue>(a);
    case 4: return launch_for_size<T, 4, kEpilogue>(a);
    case 5: return launch_for_size<T, 5, kEpilogue>(a);
    case 6: return launch_for_size<T, 6, kEpilogue>(a);
    case 7: return launch_for_size<T, 7, kEpilogue>(a);
    case 8: return launch_for_size<T, 8, kEpilogue>(a);
    case 9: return launch_for_size<T, 9, kEpilogue>(a);
    case 10: return launch_for_size<T, 10, kEpilogue>(a);
    case 11: return launch_for_size<T, 11, kEpilogue>(a);
    case 12: return launch_for_size<T, 12, kEpilogue>(a);
    case 13: return launch_for_size<T, 13, kEpilogue>(a);
    case 14: return launch_for_size<T, 14, kEpilogue>(a);
    case 15: return launch_for_size<T, 15, kEpilogue>(a);
    default: return "the power-of-two factor N = 2**" + std::to_string(a.log2_n) + " must be in [8, 32768]";
  }
}

}  // namespace linearpatch_cuda
