// Small kernels with known bugs and known answers, to test the emulator itself: each must be caught
// (a diagnostic, or a result that differs from the correct one) or must give the exact answer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace {

// Reverse n values through shared memory; with `barrier` false the reads race with the writes.
__global__ void reverse_kernel(const float* in, float* out, int n, bool barrier) {
  extern __shared__ float buf[];
  const int t = threadIdx.x;
  buf[t] = in[t];
  if (barrier) __syncthreads();
  out[t] = buf[n - 1 - t];
}

// Half of the block skips the barrier.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Two barriers on different lines, reached by different threads.
__global__ void split_barrier_kernel(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Half of the warp skips a full-mask shuffle.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = float(threadIdx.x);
  if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// The lanes shuffle on two different lines.
__global__ void split_shuffle_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x & 1) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Writes one float past the end of its dynamic shared memory.
__global__ void shared_overflow_kernel(float* out, int n) {
  extern __shared__ float buf[];
  buf[threadIdx.x + 1] = 1.f;  // thread n - 1 writes buf[n]
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// Every shuffle flavour and the warp votes; out holds 8 values per thread.
__global__ void shuffle_kernel(float* out) {
  const int t = threadIdx.x, lane = t & 31;
  const float v = float(t);
  float* o = out + 8 * t;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[1] = __shfl_sync(0xffffffffu, v, (lane * 7) & 31);
  o[2] = __shfl_up_sync(0xffffffffu, v, 3);
  o[3] = __shfl_down_sync(0xffffffffu, v, 3);
  o[4] = __shfl_xor_sync(0xffffffffu, v, 2, 8);
  o[5] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[6] = float(__ballot_sync(0xffffffffu, lane % 3 == 0) == 0x49249249u);
  o[7] = float(__any_sync(0xffffffffu, lane == 7)) + 2.f * float(__all_sync(0xffffffffu, lane < 31));
}

// Half-warp shuffles with their own masks run side by side.
__global__ void half_warp_kernel(float* out) {
  const int lane = threadIdx.x & 31;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_xor_sync(mask, float(threadIdx.x), 1);
}

// cp.async into shared memory, then the data read before (early) or after the wait.
__global__ void async_copy_kernel(const float* in, float* out, bool early) {
  __shared__ float4 stage[64];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(&stage[t], reinterpret_cast<const float4*>(in) + t, sizeof(float4));
  __pipeline_commit();
  float4 v = stage[t];
  if (!early) {
    __pipeline_wait_prior(0);
    v = stage[t];
  }
  reinterpret_cast<float4*>(out)[t] = v;
}

// cp.async with zero fill: thread t copies 16 bytes of which the last 4 (t % 5) are zeros, not read
// (thread t % 5 == 4 reads nothing: its source is a null pointer).
__global__ void async_zfill_kernel(const float* in, float* out) {
  __shared__ float4 stage[64];
  const int t = threadIdx.x;
  const size_t zfill = 4 * size_t(t % 5);
  const float4* src = zfill == 16 ? nullptr : reinterpret_cast<const float4*>(in) + t;
  __pipeline_memcpy_async(&stage[t], src, sizeof(float4), zfill);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  reinterpret_cast<float4*>(out)[t] = stage[t];
}

// Packs two values as the 16-bit pair of a .f16x2 / .bf16x2 register (the lower index in the low half).
template <typename T>
__device__ uint32_t pack_pair(float lo, float hi) {
  T a(lo), b(hi);
  uint16_t x, y;
  memcpy(&x, &a, 2);
  memcpy(&y, &b, 2);
  return uint32_t(x) | uint32_t(y) << 16;
}

// One mma.m16n8k16 of one warp, its fragments built from the PTX ISA's layout formulas
// (groupID = laneid >> 2, threadID_in_group = laneid % 4): in = A (16 x 16, row-major), then
// B (16 x 8, row-major: B[k][n] at 16 * 16 + 8 k + n), then C (16 x 8); out = D (16 x 8).
template <typename T>
__global__ void mma_kernel(const float* in, float* out, bool divergent) {
  const float *A = in, *B = in + 256, *C = in + 384;
  const int lane = threadIdx.x & 31, group = lane >> 2, tig = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int reg = 0; reg < 4; ++reg) {  // elements a(2 reg), a(2 reg + 1)
    float v[2];
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * reg + h;
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = i < 4 ? tig * 2 + (i & 1) : tig * 2 + (i & 1) + 8;
      v[h] = A[16 * row + col];
    }
    a[reg] = pack_pair<T>(v[0], v[1]);
  }
  for (int reg = 0; reg < 2; ++reg) {  // elements b(2 reg), b(2 reg + 1)
    float v[2];
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * reg + h;
      const int row = i < 2 ? tig * 2 + (i & 1) : tig * 2 + (i & 1) + 8;
      v[h] = B[8 * row + group];
    }
    b[reg] = pack_pair<T>(v[0], v[1]);
  }
  for (int i = 0; i < 4; ++i) c[i] = C[8 * (i < 2 ? group : group + 8) + tig * 2 + (i & 1)];
  if (divergent && lane < 16) {
    if (sizeof(T) == 2 && std::is_same<T, __half>::value) mma_m16n8k16_f16(d, a, b, c);
    else mma_m16n8k16_bf16(d, a, b, c);
  } else {
    if (sizeof(T) == 2 && std::is_same<T, __half>::value) mma_m16n8k16_f16(d, a, b, c);
    else mma_m16n8k16_bf16(d, a, b, c);
  }
  for (int i = 0; i < 4; ++i) out[8 * (i < 2 ? group : group + 8) + tig * 2 + (i & 1)] = d[i];
}

// ldmatrix .x4 (and .trans): four 8 x 8 matrices of 16-bit values (in[64 j + 8 r + c], stored as
// bf16) in shared memory with a row pitch of 24 elements; lane l names row l % 8 of matrix l / 8.
// out[4 l + j] holds lane l's register j (its bits).
__global__ void ldmatrix_kernel(const float* in, float* out, bool trans) {
  __shared__ __align__(16) __nv_bfloat16 tiles[4 * 8 * 24];
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < 256; i += 32) tiles[(i / 64) * 8 * 24 + ((i / 8) % 8) * 24 + i % 8] = __nv_bfloat16(in[i]);
  __syncwarp();
  uint32_t r[4];
  const __nv_bfloat16* row = tiles + (lane / 8) * 8 * 24 + (lane % 8) * 24;
  if (trans) ldmatrix_x4_trans(r, row);
  else ldmatrix_x4(r, row);
  for (int j = 0; j < 4; ++j) memcpy(&out[4 * lane + j], &r[j], 4);
}

// A grid-stride loop over the blocks of a persistent grid sized from the SM count.
__global__ void grid_stride_kernel(const float* in, float* out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = 2.f * in[i];
}

// Thread 5 writes through a null pointer.
__global__ void wild_write_kernel(float* out) {
  float* p = threadIdx.x == 5 ? nullptr : out;
  p[threadIdx.x] = 1.f;
}

std::string launch_result(const char* what) {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorName(e);
}

std::string message;

}  // namespace

extern "C" const char* emu_last_diagnostic();
extern "C" void emu_clear_diagnostic();

// Run self-test `which` on n threads (one block unless said otherwise). Returns nullptr or an error.
extern "C" const char* selftest_run(const char* which, const float* in, float* out, int n) {
  emu_clear_diagnostic();
  const std::string w = which;
  const size_t smem = sizeof(float) * n;
  if (w == "reverse" || w == "reverse_racy") {
    reverse_kernel<<<1, n, smem>>>(in, out, n, w == "reverse");
  } else if (w == "divergent_barrier") {
    divergent_barrier_kernel<<<1, n>>>(out);
  } else if (w == "split_barrier") {
    split_barrier_kernel<<<1, n>>>(out);
  } else if (w == "divergent_shuffle") {
    divergent_shuffle_kernel<<<1, n>>>(out);
  } else if (w == "split_shuffle") {
    split_shuffle_kernel<<<1, n>>>(out);
  } else if (w == "shared_overflow") {
    shared_overflow_kernel<<<1, n, smem>>>(out, n);
  } else if (w == "shuffle") {
    shuffle_kernel<<<1, n>>>(out);
  } else if (w == "half_warp") {
    half_warp_kernel<<<1, n>>>(out);
  } else if (w == "async_copy" || w == "async_copy_early") {
    async_copy_kernel<<<1, n>>>(in, out, w == "async_copy_early");
  } else if (w == "async_zfill") {
    async_zfill_kernel<<<1, n>>>(in, out);
  } else if (w == "mma_bf16" || w == "mma_f16" || w == "mma_divergent") {
    if (w == "mma_f16") mma_kernel<__half><<<1, n>>>(in, out, false);
    else mma_kernel<__nv_bfloat16><<<1, n>>>(in, out, w == "mma_divergent");
  } else if (w == "ldmatrix" || w == "ldmatrix_trans") {
    ldmatrix_kernel<<<1, n>>>(in, out, w == "ldmatrix_trans");
  } else if (w == "too_much_shared") {
    reverse_kernel<<<1, n, 64 * 1024>>>(in, out, n, true);  // > 48 KiB without the opt-in
  } else if (w == "wild_write") {
    wild_write_kernel<<<1, n>>>(out);
  } else if (w == "grid_stride") {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    grid_stride_kernel<<<sms, 32>>>(in, out, n);
  } else {
    message = "unknown self-test " + w;
    return message.c_str();
  }
  message = launch_result(which);
  const std::string why = emu_last_diagnostic();
  if (!why.empty()) message += (message.empty() ? "" : ": ") + why;
  return message.empty() ? nullptr : message.c_str();
}
