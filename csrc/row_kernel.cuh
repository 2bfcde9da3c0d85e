// row_kernel: K = 1, every N = 2**m from 8 to 32768. Butterflies in registers, the bits held by
// other threads exchanged through shared-memory transposes.
//
// The T = 2**kLogT threads of a row hold 2**kLogR values each (kLogT + kLogR = kLogN, kLogR >= kLogT
// up to N = 16384, where T = 128 threads, one block, own a row; at most 128 values per thread). At
// N = 32768 T = 256 = 2 R, and one bit of B (the "split" bit) stays a thread bit in L1: lane bit 0,
// one __shfl_xor_sync stage per transform (1/15 of the butterflies) instead of a third layout. The
// column index n of value j of thread t has two layouts
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
// s/d arrives prepared (linearpatch_kernels/backends/cuda_backend.py, prepare_scale: once per scale
// tensor, not per block or launch). Up to N = 8192 in L1 register order as float4 planes: plane q of
// thread t at float4 q * T + t, holding s/d at columns l1_thread(t) | l1_reg(4q .. 4q + 3); a block
// stages it in shared memory with 16-byte copies, the same planes (conflict-free); the norm weight of
// the epilogue, up to N = 4096, arrives prepared in L0 register order (plane q of thread t: columns
// l0_thread(t) | l0_reg(4q .. 4q + 3)) and is staged the same way. From N = 16384 s (64 KiB) and a row's buffer (72 KiB in
// fp16/bf16) would leave one block per SM, so s/d comes in column order and each thread reads its
// values per row in L1 order through the cache: a load instruction reads whole 32-byte sectors in
// fp16/bf16 (8 threads on 8 consecutive floats) and half sectors in fp32. (Reading the planes instead,
// 16 bytes apart across the warp, took 4x the sectors per instruction and, as float4 loads, spilled.)
// With 3 blocks' buffers in shared memory, 64 KiB of s hardly stays in L1: expect it from L2, 4 bytes
// per element beside the 4 (bf16) of HBM traffic; the SASS model does not charge it to any pipe.
//
// Shared-memory word of n: word(n) = n + c1 (n >> s1) + c2 (n >> s2). It is strictly increasing (so
// one-to-one) and additive over disjoint bit patterns, so word(thread part | register part) is a
// per-thread base plus a compile-time offset: every transpose access is one instruction with an
// immediate offset. The padding makes both sides conflict-free: the 16-byte L0 accesses (a quarter
// warp covers n bits v, v+1, v+2: words 2**v, 2**(v+1), 2**(v+2) + c1) and the 4-byte L1 accesses
// (a warp's 4- or 8-byte accesses cover A's bits from kLogE up, and at N = 32768 the split bit, whose
// words are 2**kLogE, ..., 16 mod 32 by the choice of c2).
#pragma once

#include "kernel_primitives.cuh"

namespace linearpatch_cuda {

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


// Lanes l and l ^ 1 exchange every value: the even lane keeps a + b, the odd one a - b, i.e.
// new = other + sign * mine with sign = -1 on the odd lane (exact, like the additions above).
template <int R>
__device__ __forceinline__ void butterflies_across_lane_bit0(float (&v)[R]) {
  const float sign = (threadIdx.x & 1) ? -1.f : 1.f;
#pragma unroll
  for (int j = 0; j < R; ++j) v[j] = fmaf(sign, v[j], __shfl_xor_sync(0xffffffffu, v[j], 1));
}

constexpr int kRowThreads = 128;  // 64 where two rows of shared memory do not fit (N = 8192 on sm_86/89)
constexpr int kMaxRowLog2N = 15;  // N = 32768: 128 values per thread, 256 threads per row

// Threads per block: kRowThreads, or one row's T where that is more (N = 32768).
template <class L>
__host__ __device__ constexpr int row_block_threads() { return cmax(kRowThreads, L::T); }
// The block of the few-row grid (launch_rows): one row, at least a warp (rows of T < 32 threads share it).
template <class L>
__host__ __device__ constexpr int row_one_row_threads() { return cmax(32, L::T); }
constexpr int kRowPartials = 8;  // the epilogue's per-warp sums: up to 8 warps per block

// The epilogue keeps the norm weight in shared memory up to N = 4096; at 8192 it is read through the
// L1 cache instead (16-byte loads in L0 order), so that a block fits in every sm_80+ GPU.
template <class L, Op kOp>
__host__ __device__ constexpr bool row_stages_weight() { return kOp == Op::kAddPatchRmsNorm && L::kLogN <= 12; }

// s/d (prepared) in shared memory up to N = 8192; from 16384 it is read through the L1 cache (see above).
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

// The first four butterfly stages of the first transform on the tensor cores (h16_on_vector in
// kernel_primitives.cuh): fp16/bf16 (the raw vector is the mma fragment) and at least 4 threads per
// row (n bits 3-4 on lane bits 0-1): every fp16/bf16 N >= 32, but where the SASS model says it is
// slower: the patch at N = 16384, latency-bound on its per-row reads of s/d through the cache (3.44x
// a copy against 2.83x: 38 and 41 round trips before the first row, and the steady rows wait
// longer), and the transform at N = 64-256, latency-bound with few instructions either way (1.11x
// against 1.09x at 64 on the H200, 1.22x against 1.20x at 256), while the transform and the epilogue
// gain at 16384 and the patch and epilogue at 64-256. Why only these four stages: csrc/README.md.
template <class L, Op kOp>
__host__ __device__ constexpr bool row_tensor_cores() {
  return L::V == 8 && L::kLogT >= 2 && !(kOp == Op::kPatch && L::kLogN == 14) &&
         !(kOp == Op::kTransform && L::kLogN >= 6 && L::kLogN <= 8);
}

template <class L, Op kOp>
__host__ __device__ constexpr int row_min_blocks() {
  // N = 16384: shared memory holds 3 blocks (one row each) on sm_90; the epilogue would spill in 170
  // registers, so it keeps 2.
  if (L::kLogN == 14) return kOp == Op::kAddPatchRmsNorm ? 2 : 3;
  if (L::kLogN == 15) return 1;  // one block of 256 threads per SM (145 KiB of shared memory in fp16/bf16)
  return !row_prefetches<L, kOp>() ? 1 : kOp == Op::kPatch ? 4 : 3;
}

// Persistent: the grid covers the multiprocessors once (see launch_rows; for as many rows as there are
// SMs or fewer, one row per block); each block stages s (and the norm weight) once and then loops over
// groups of blockDim.x / T rows. `s` is the prepared s/d (above); `out_scale` scales the transform only.
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

  const float4* const s4 = reinterpret_cast<const float4*>(s_l1) + t;
  const float* const s1 = kPatch ? s + L::l1_thread(t) : s;  // N >= 16384: s/d in column order through the cache
  const float4* const w4 = reinterpret_cast<const float4*>(w_l0) + t;
  const int g0 = L::l0_thread(t), w0 = L::word(g0), w1 = L::word(L::l1_thread(t));
  const int64_t step = int64_t(gridDim.x) * rows_per_iter;
  const int64_t first_row = int64_t(blockIdx.x) * rows_per_iter + slot;

  constexpr bool kPrefetch = row_prefetches<L, kOp>();
  constexpr bool kTensorCores = row_tensor_cores<L, kOp>();
  // With tensor cores, a row past the end loads the last row instead of nothing (rows >= 1: the
  // launchers skip empty tensors), so that the registers below are always just loaded: keeping the
  // old ones where nothing was loaded cost register copies, and zeros a select per word (0.5-1
  // instructions per element); the idle row computes on them and stores nothing.
  auto clamp_row = [&](int64_t r) { return kTensorCores && r >= rows ? rows - 1 : r; };
  uint4 ahead[kPrefetch ? L::R / L::V : 1], ahead_u[kPrefetch && kEpilogue ? L::R / L::V : 1];
  auto load_ahead = [&](int64_t r) {
    if constexpr (kPrefetch) {
      r = clamp_row(r);
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
  // Without the prefetch, up to N = 8192: every 16-byte load of the row leaves before any is
  // converted, one memory round trip (converting each vector as it came, the compiler spread the
  // loads over the first transform: 7 dependent round trips at N = 8192 by the SASS model). The empty
  // asm with a memory clobber keeps the compiler from sinking loads below it. Not from 16384, where
  // the raw vectors would not fit beside the row (170 registers for 3 blocks: they spill), nor at
  // 8192 for fp32 or the epilogue (two raw rows): 255 registers and 96-664 bytes of spills there.
  constexpr bool kLoadsFirst =
      !kPrefetch && (L::kLogN <= 12 || (L::kLogN == 13 && sizeof(T) == 2 && !kEpilogue));
  uint4 raw[kLoadsFirst ? L::R / L::V : 1], raw_u[kLoadsFirst && kEpilogue ? L::R / L::V : 1];
  auto load_raw = [&](int64_t r) {
    if constexpr (kLoadsFirst) {
      r = clamp_row(r);
      if (r < rows) {
#pragma unroll
        for (int jt = 0; jt < L::R / L::V; ++jt) {
          raw[jt] = *reinterpret_cast<const uint4*>(x + r * L::N + g0 + L::l0_reg(jt * L::V));
          if constexpr (kEpilogue) raw_u[jt] = *reinterpret_cast<const uint4*>(e.update + r * L::N + g0 + L::l0_reg(jt * L::V));
        }
      }
      asm volatile("" ::: "memory");
    }
  };
  // The first row's loads leave before the staging of s (prefetch or loads-first alike), so that the
  // two memory round trips overlap: a one-row launch waits for one, as the transform does.
  constexpr bool kFirstRowEarly = kLoadsFirst && kStageS;
  // Programmatic dependent launch (sm_90, kernel_primitives.cuh): everything above is indices and
  // pointers; the first global access comes after the wait.
  grid_dependency_wait();
  grid_dependents_launch();
  if constexpr (kPrefetch) load_ahead(first_row);
  if constexpr (kFirstRowEarly) load_raw(first_row);
  const H16Fragments h16 = kTensorCores ? h16_fragments<T>() : H16Fragments{0u, 0u};  // B of H_16 (constants)

  if constexpr (kStageS) {
    // s/d arrives prepared in this order: a plain copy, N / 4 16-byte cp.async copies per block (8 per
    // thread at N = 4096), all in flight before any wait, and no rescale (1/d is in it). (Before, each
    // block gathered s from column order with 4-byte copies, 32 per thread at N = 4096, and rescaled
    // every word; before that, one dependent load at a time took ~16 us per block on the H200: a
    // one-row patch took 21.1 us, the transform 4.8.) The epilogue's norm weight, prepared in L0 order
    // up to N = 4096, is copied the same way, in flight beside s.
    for (int i = threadIdx.x; i < L::N / 4; i += blockDim.x)
      __pipeline_memcpy_async(&smem4[i], reinterpret_cast<const float4*>(s) + i, 16);
    if constexpr (kStageWeight) {  // prepared in L0 order the same way (cuda_backend.prepare_norm_weight)
      for (int i = threadIdx.x; i < L::N / 4; i += blockDim.x)
        __pipeline_memcpy_async(reinterpret_cast<float4*>(w_l0) + i, reinterpret_cast<const float4*>(e.weight) + i, 16);
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
  }

  for (int64_t base = int64_t(blockIdx.x) * rows_per_iter; base < rows; base += step) {
    const int64_t row = base + slot;
    const bool active = row < rows;  // idle rows of the last group compute on zeros, store nothing
    float v[L::R];
    if constexpr (kLoadsFirst) {
      if (!kFirstRowEarly || row != first_row) load_raw(row);  // the first row's left before the staging
    }
    if constexpr (kTensorCores) {
      // The raw vectors (an idle row's too: the whole warp runs the mma) through H_16 over n bits
      // {0, 2, 3, 4}; the epilogue's update goes through the same products into the same sums. Loaded
      // here (no prefetch, not loads-first: the epilogue from 8192, the transform at 16384), they
      // leave in batches of 4 vectors, each batch before any of its products: loaded one by one
      // beside the mma, the compiler made a memory round trip of each (69 before the first row of
      // the 16384 patch by the SASS model, 38 with batches); the whole row at once would not fit in
      // 170 registers (216-240 bytes of spills).
      constexpr int kBatch = (kPrefetch || kLoadsFirst) ? L::R / L::V : cmin(4, L::R / L::V);
      static_assert((L::R / L::V) % kBatch == 0, "whole batches");
#pragma unroll
      for (int j0 = 0; j0 < L::R / L::V; j0 += kBatch) {
        uint4 r[kBatch], ru[kEpilogue ? kBatch : 1];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          const int jt = j0 + i;
          // An idle row runs on the last row's vectors (clamp_row above), not on zeros: the mma keeps
          // rows apart (row g of D is row g of A times H_16, and lanes 4g .. 4g + 3 belong to one
          // row), so its values never reach an active row, and it stores nothing.
          if constexpr (kPrefetch) {
            r[i] = ahead[jt];
            if constexpr (kEpilogue) ru[i] = ahead_u[jt];
          } else if constexpr (kLoadsFirst) {
            r[i] = raw[jt];
            if constexpr (kEpilogue) ru[i] = raw_u[jt];
          } else {
            r[i] = ru[kEpilogue ? i : 0] = make_uint4(0u, 0u, 0u, 0u);
            if (active) {
              const int64_t at = row * L::N + g0 + L::l0_reg(jt * L::V);
              r[i] = *reinterpret_cast<const uint4*>(x + at);
              if constexpr (kEpilogue) ru[i] = *reinterpret_cast<const uint4*>(e.update + at);
            }
          }
        }
        if constexpr (!kPrefetch && !kLoadsFirst) asm volatile("" ::: "memory");
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          h16_on_vector<T>(r[i], h16, vec_at<L::V>(v, j0 + i));
          if constexpr (kEpilogue) h16_on_vector<T>(ru[i], h16, vec_at<L::V>(v, j0 + i), true);
        }
      }
    }
#pragma unroll
    for (int jt = 0; jt < (kTensorCores ? 0 : L::R / L::V); ++jt) {
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
        if constexpr (kLoadsFirst) unpack_raw(raw[jt], x, vj);
        else load_vec(x + row * L::N + g0 + L::l0_reg(jt * L::V), vj);
        if constexpr (kEpilogue) {
          float u[L::V];
          if constexpr (kLoadsFirst) unpack_raw(raw_u[jt], x, u);
          else load_vec(e.update + row * L::N + g0 + L::l0_reg(jt * L::V), u);
#pragma unroll
          for (int i = 0; i < L::V; ++i) vj[i] += u[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < L::V; ++i) vj[i] = 0.f;
      }
    }
    if constexpr (kPrefetch) load_ahead(row + step);
    // A, first transform (with tensor cores, n bits 0 and 2, register bits 0 and 2, are done)
    if constexpr (kTensorCores) {
      butterflies_over<1, 2>(v);
      butterflies_over<3, L::kLogR>(v);
    } else {
      butterflies_over<0, L::kLogR>(v);
    }

    if constexpr (L::kLogT > 0) {
#pragma unroll
      for (int q = 0; q < L::R / 4; ++q)
        *reinterpret_cast<float4*>(buf + w0 + L::word(L::l0_reg(4 * q))) =
            make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
      sync_row();
#pragma unroll
      for (int j = 0; j < L::R; j += L::kL1Vec) shared_to_registers<L::kL1Vec>(buf + w1 + L::word(L::l1_reg(j)), &v[j]);
      // B, first transform (with tensor cores, its lowest two bits, n bits 3 and 4, are done)
      butterflies_over<L::kLogE + (kTensorCores ? 2 : 0), L::kLogR>(v);
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
      // h = v (1/d is in the prepared s); the row's sum of h^2 over its registers, its lanes, its warps.
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
        store_vec(yr + L::l0_reg(jt * L::V), vec_at<L::V>(v, jt), kPatch ? 1.f : out_scale);
    }
  }
}

}  // namespace linearpatch_cuda
