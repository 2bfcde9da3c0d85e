// What every kernel family shares: the operators, 16-byte vectors <-> fp32 registers, butterflies
// over register bits, shared memory <-> registers, the epilogue's row sums.
//
// Notation used by all kernels. A row x of length d = K * N (N = 2**m) is viewed row-major as a
// K x N matrix X; then
//     x . H_d = vec(H_K X H_N)        (H_d = H_K (x) H_N, every factor symmetric)
// H_N (Sylvester) is a fast Walsh-Hadamard transform: one butterfly (a, b) -> (a + b, a - b) per
// bit of the column index n, in any order (the stages commute). H_K (a +-1 Paley matrix, K a multiple
// of 4, K <= 256) is a small dense multiply over the row index k. The patch is
// y = x . H_d diag(s) H_d / d. The fused interface epilogue (Op::kAddPatchRmsNorm) is the patch of
// x + u, followed by RMSNorm:
//     h = (x + u) . H_d diag(s) H_d / d,    normed = h * rsqrt(sum(h^2) / d + eps) * w
// with both outputs stored. Everything is computed in fp32; x and y are fp32, fp16 or bf16, moved as
// 16-byte vectors of V = 4 (fp32) or 8 (fp16/bf16) elements.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

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

__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up4(int n) { return (n + 3) / 4 * 4; }

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

// 16 bytes as loaded -> fp32, for every element type (fp32: the four floats as they are).
__device__ __forceinline__ void unpack_raw(const uint4 raw, const float*, float (&v)[4]) {
  v[0] = __uint_as_float(raw.x); v[1] = __uint_as_float(raw.y); v[2] = __uint_as_float(raw.z); v[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack_raw(const uint4 raw, const __half* p, float (&v)[8]) { unpack_vec(raw, p, v); }
__device__ __forceinline__ void unpack_raw(const uint4 raw, const __nv_bfloat16* p, float (&v)[8]) { unpack_vec(raw, p, v); }

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
// Warp-level matrix instructions (sm_80+): the kernels' portable names. On the GPU inline PTX; the CUDA
// emulator (csrc/emulation/include/emulated_cuda.h) defines the same names with the PTX semantics.
//   mma_m16n8k16_{bf16,f16}(d, a, b, c): D (16 x 8, fp32) = A (16 x 16) B (16 x 8) + C; fragments (groupID
//     g = lane >> 2, threadID_in_group t = lane % 4): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
//     a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]; b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g];
//     c/d: [0] = (g, 2t), [1] = (g, 2t+1), [2] = (g+8, 2t), [3] = (g+8, 2t+1); the lower index of a pair
//     in the low 16 bits.
//   ldmatrix_x4_trans(r, p): lane l names row l % 8 of 8 x 8 matrix l / 8 (16 bytes in shared memory);
//     r[j] = the elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) of matrix j: a column pair.

#ifndef __CUDA_EMULATION__
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}
#endif

// Programmatic dependent launch (sm_90+; launch_rows): a kernel launched with the programmatic stream
// serialization attribute may start while the kernel before it in the stream is still finishing.
// grid_dependency_wait() returns once that kernel has completed and its writes are visible, so nothing
// it may write or still read (x, s, the norm weight, the memory of y) may be touched before it; what
// comes before overlaps that kernel's end. grid_dependents_launch() lets the next such kernel start its
// own setup. Both are no-ops below sm_90 and for a launch without the attribute; the CUDA emulator
// (csrc/emulation/include/emulated_cuda.h) defines the same names (launches run one after another
// there: it counts the waits).
#ifndef __CUDA_EMULATION__
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
#endif

// D = A B + C for the 16-bit input type T (__half or __nv_bfloat16), and T's 1.0 and -1.0 as bits.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  if constexpr (std::is_same<T, __half>::value) mma_m16n8k16_f16(d, a, b, c);
  else mma_m16n8k16_bf16(d, a, b, c);
}
template <typename T>
__host__ __device__ constexpr uint32_t one_bits() { return std::is_same<T, __half>::value ? 0x3c00u : 0x3f80u; }

// H_16 on the tensor cores over a 16-byte vector of fp16/bf16 values per lane, as loaded (row_kernel).
// A warp whose lanes hold vectors at n = jv | lane << 3 | (other bits) (jv = 0..7 inside the vector:
// row_kernel's L0 layout, T >= 4 threads per row) runs the four butterfly stages over the n bits
// {0, 2, 3, 4} of its 32 x 8 values with two mma.m16n8k16, A the data and B = H_16:
//   A[row][k]: row = lane bits 2-4 (g) and n bit 1 (a[0] vs a[1]); k = n bit 0 (the half of a 32-bit
//     word), n bits 3-4 (lane bits 0-1, t) and n bit 2 (a[0] vs a[2]). So a = the vector's 32-bit
//     words in order: the fragment is the raw vector as loaded (LDG.128 and HMMA both take 4
//     consecutive registers), no data moves. (With n bits {0, 1, 3, 4} a would be words {0, 2, 1, 3}:
//     ptxas then copied the vectors into new register quads, 60 MOV per thread and row of the 4096
//     patch by the SASS model, about 4 % of its instructions.)
//   D[row][kout] = sum_k A[row][k] H_16[k][kout], H_16[k][j] = (-1)^popcount(k & j) (Sylvester, the
//     four butterflies over the bits of k); mma h computes kout = 8 h + 0..7, and lane (g, t) receives
//     (row g, kout 2t, 2t + 1) and (row g + 8, the same): kout bits 1-2 are t again, so every output
//     lands in the lane that held the input at the same n, in register jv = n0 | n1 << 1 | n2 << 2:
//     mma h gives jv = 4h .. 4h + 3, in order.
// Exact: the products are +-x (exact) and the tensor core adds them in fp32 (one rounding of a 16-term
// sum where the four scalar stages round four times; csrc/README.md, Accuracy).
// H_16[k][8h + j] for the k of b[r] (2t + 8r + e) and j = g: the sign is parity((2t + e) & g) xor
// (r & h), so the four B registers are one word w (b[0][0] = b[0][1] = b[1][0]) and w with both signs
// flipped (b[1][1]): two registers per lane, kept for the kernel's lifetime.
struct H16Fragments {
  uint32_t w, w_flipped;
};
template <typename T>
__device__ __forceinline__ H16Fragments h16_fragments() {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint32_t w = 0;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const uint32_t negative = (0x6996u >> ((2 * t + e) & g)) & 1u;  // parity of a 4-bit number
    w |= (one_bits<T>() | (negative << 15)) << (16 * e);
  }
  return {w, w ^ 0x80008000u};
}

// v = (the 8 values of `raw`) . H_16 over n bits {0, 2, 3, 4} across the warp (above), in fp32, plus
// `acc` (the epilogue's second input goes through the same products into the same sums).
template <typename T>
__device__ __forceinline__ void h16_on_vector(const uint4 raw, const H16Fragments f, float (&v)[8],
                                              bool accumulate = false) {
  const uint32_t a[4] = {raw.x, raw.y, raw.z, raw.w};
  const uint32_t b[2][2] = {{f.w, f.w}, {f.w, f.w_flipped}};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float c[4] = {accumulate ? v[4 * h] : 0.f, accumulate ? v[4 * h + 1] : 0.f,
                        accumulate ? v[4 * h + 2] : 0.f, accumulate ? v[4 * h + 3] : 0.f};
    float d[4];
    mma_m16n8k16<T>(d, a, b[h], c);
    v[4 * h] = d[0]; v[4 * h + 1] = d[1]; v[4 * h + 2] = d[2]; v[4 * h + 3] = d[3];
  }
}

// ---------------------------------------------------------------------------------------------
// Butterflies and shared memory

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

template <int V, int R>
__device__ __forceinline__ float (&vec_at(float (&v)[R], int jt))[V] {
  return *reinterpret_cast<float(*)[V]>(&v[jt * V]);
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

}  // namespace linearpatch_cuda
