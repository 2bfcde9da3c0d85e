// CUDA built-ins for the host C++ compiler, so that the real kernels and launchers of csrc/ run on
// the CPU (see ../README.md). Every CUDA thread is a fiber; the scheduler in ../runtime.cpp runs the
// threads of a block in a random order between synchronisation points, checks that barriers and
// warp collectives are reached by the threads they name at the same place, and fills shared memory
// with NaN (all-ones bytes: NaN in fp32, fp16, bf16 and fp64) before each block.
//
// The build (../emulate.py) rewrites the two pieces of CUDA syntax no header can provide:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  ::emu::launch(kernel, grid, block, smem, stream)(args)
//   extern __shared__ T name[];                  ->  T* name = ::emu::dynamic_shared<T>();
//   __shared__ T name[n]...;                     ->  a per-block array of the block's shared memory
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Qualifiers: all code is host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __constant__
#define __managed__
#define __align__(n) alignas(n)
#define __CUDA_EMULATION__ 1

// ---------------------------------------------------------------------------------------------
// Vector types (the alignment CUDA gives them, so that vector loads keep their alignment contract).
#define EMU_VEC2(T, name, a) struct alignas(a) name { T x, y; };
#define EMU_VEC3(T, name) struct name { T x, y, z; };
#define EMU_VEC4(T, name, a) struct alignas(a) name { T x, y, z, w; };
EMU_VEC2(float, float2, 8) EMU_VEC4(float, float4, 16) EMU_VEC3(float, float3)
EMU_VEC2(int, int2, 8) EMU_VEC4(int, int4, 16) EMU_VEC3(int, int3)
EMU_VEC2(unsigned, uint2, 8) EMU_VEC4(unsigned, uint4, 16) EMU_VEC3(unsigned, uint3)
EMU_VEC2(double, double2, 16) EMU_VEC2(unsigned short, ushort2, 4) EMU_VEC4(unsigned short, ushort4, 8)
EMU_VEC2(long long, longlong2, 16) EMU_VEC2(unsigned long long, ulonglong2, 16)
EMU_VEC4(unsigned char, uchar4, 4) EMU_VEC4(signed char, char4, 4)
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---------------------------------------------------------------------------------------------
// The runtime API subset the launchers use.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef cudaError_t cudaError;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 11,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = nullptr);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*func)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}
// The fields the launchers read: the virtual architecture the kernel's code was compiled for and that of
// its binary (here both the emulated device's compute capability, x 10).
struct cudaFuncAttributes {
  int ptxVersion;
  int binaryVersion;
};
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func);
template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*func)(P...)) {
  return cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(func));
}
// Occupancy as the emulated device reports it (a fixed, documented answer: see runtime.cpp).
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor_impl(int* blocks, const void* func, int threads, size_t smem);
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*func)(P...), int threads, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor_impl(blocks, reinterpret_cast<const void*>(func), threads, smem);
}

// ---------------------------------------------------------------------------------------------
// The emulator's interface to the kernels.
namespace emu {

struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern ThreadState* current;  // the running fiber's thread

// Launch: run every block of the grid (in a random order), each block's threads as fibers.
// Returns after the grid has finished (launches are synchronous here). `int_args` are the integer
// arguments as passed (kNotInteger for the others), kept in the launch log for the SASS model.
constexpr long long kNotInteger = (-9223372036854775807LL - 1);
void run_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body,
                std::vector<long long> int_args = {});

template <typename A>
long long integer_argument(const A& a) {
  if constexpr (std::is_integral<A>::value) return static_cast<long long>(a);
  else return kNotInteger;
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // By value, converted to the parameter types once, as a launch does.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    std::vector<long long> ints = std::apply([](const auto&... a) { return std::vector<long long>{integer_argument(a)...}; }, params);
    run_kernel(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, params); }, ints);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block, smem};
}

// Shared memory of the running block.
void* dynamic_shared_bytes();
void* static_shared_bytes(const void* key, size_t bytes, size_t align);
template <typename T>
T* dynamic_shared() { return static_cast<T*>(dynamic_shared_bytes()); }
template <typename A>
A& static_shared(const void* key) { return *static_cast<A*>(static_shared_bytes(key, sizeof(A), alignof(A))); }

// Synchronisation points; `line` names the call site (divergence checks).
void syncthreads(int line);
int syncthreads_count(int line, int predicate);
void syncwarp(int line, unsigned mask);
enum class Collective { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kGather };
uint64_t warp_collective(int line, Collective op, unsigned mask, uint64_t value, int param, int width);
// Every lane of `mask` brings `bytes` bytes at the same line; each receives all 32 lanes' (lane order,
// absent lanes zero) in `out`. The building block of the warp-wide matrix instructions below.
void warp_allgather(int line, unsigned mask, const void* in, size_t bytes, void* out);
[[noreturn]] void fatal(const char* what);

template <typename T>
T shuffle(int line, Collective op, unsigned mask, T value, int param, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type CUDA cannot shuffle");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_collective(line, op, mask, bits, param, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// cp.async (sm_80) as the pipeline primitives: a copy is recorded and only performed when the
// thread waits for it, so reading the destination too early reads the NaN fill, as a race would.
// `zfill`: the last zfill bytes of the copy are zeros, not read from src (cp.async's src-size <
// cp-size; __pipeline_memcpy_async's fourth argument).
void pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill = 0);
void pipeline_commit();
void pipeline_wait_prior(int pending);

// Warp-level matrix instructions (PTX ISA, "Warp Level Matrix Multiply-Accumulate Instructions"),
// with the fragment layouts of the PTX definitions; every lane of the warp must reach them at the same
// line (".sync.aligned"), or the launch stops like a divergent shuffle.
enum class MmaInput { kBf16, kF16 };
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32  {d0..d3}, {a0..a3}, {b0, b1}, {c0..c3}:
// D (16 x 8) = A (16 x 16) B (16 x 8) + C in fp32. The products are exact; the emulator sums them and C
// in fp64 and rounds once to fp32 (a GPU may differ in the last bit of the sum).
void mma_m16n8k16(int line, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                  MmaInput input);
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lane l (< 8 * count) gives the address of row
// l % 8 of matrix l / 8 (16 bytes, 16-byte aligned, in shared memory); lane l receives in r[j] the
// 32-bit word (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix j, or with .trans the two
// 16-bit elements (rows 2 (l % 4) and 2 (l % 4) + 1, column l / 4).
void ldmatrix(int line, uint32_t* r, int count, const void* row_address, bool trans);

}  // namespace emu

#define threadIdx (::emu::current->thread_idx)
#define blockIdx (::emu::current->block_idx)
#define blockDim (::emu::current->block_dim)
#define gridDim (::emu::current->grid_dim)
#define warpSize 32

#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __syncthreads_count(p) ::emu::syncthreads_count(__LINE__, (p) ? 1 : 0)
#define __syncthreads_or(p) (::emu::syncthreads_count(__LINE__, (p) ? 1 : 0) != 0)
#define __syncwarp(...) ::emu::syncwarp(__LINE__, ::emu::detail_mask(__VA_ARGS__))
#define __shfl_sync(mask, v, lane, ...) \
  ::emu::shuffle(__LINE__, ::emu::Collective::kShflIdx, (mask), (v), (lane), ::emu::detail_width(__VA_ARGS__))
#define __shfl_up_sync(mask, v, delta, ...) \
  ::emu::shuffle(__LINE__, ::emu::Collective::kShflUp, (mask), (v), (delta), ::emu::detail_width(__VA_ARGS__))
#define __shfl_down_sync(mask, v, delta, ...) \
  ::emu::shuffle(__LINE__, ::emu::Collective::kShflDown, (mask), (v), (delta), ::emu::detail_width(__VA_ARGS__))
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::emu::shuffle(__LINE__, ::emu::Collective::kShflXor, (mask), (v), (lane_mask), ::emu::detail_width(__VA_ARGS__))
// The kernels' portable names for the matrix instructions (csrc defines them with inline PTX).
#define mma_m16n8k16_bf16(d, a, b, c) ::emu::mma_m16n8k16(__LINE__, (d), (a), (b), (c), ::emu::MmaInput::kBf16)
#define mma_m16n8k16_f16(d, a, b, c) ::emu::mma_m16n8k16(__LINE__, (d), (a), (b), (c), ::emu::MmaInput::kF16)
#define ldmatrix_x4(r, p) ::emu::ldmatrix(__LINE__, (r), 4, (p), false)
#define ldmatrix_x4_trans(r, p) ::emu::ldmatrix(__LINE__, (r), 4, (p), true)
#define ldmatrix_x2(r, p) ::emu::ldmatrix(__LINE__, (r), 2, (p), false)
#define ldmatrix_x2_trans(r, p) ::emu::ldmatrix(__LINE__, (r), 2, (p), true)
#define ldmatrix_x1(r, p) ::emu::ldmatrix(__LINE__, (r), 1, (p), false)
#define __ballot_sync(mask, p) \
  unsigned(::emu::warp_collective(__LINE__, ::emu::Collective::kBallot, (mask), (p) ? 1 : 0, 0, 32))
#define __any_sync(mask, p) int(::emu::warp_collective(__LINE__, ::emu::Collective::kAny, (mask), (p) ? 1 : 0, 0, 32))
#define __all_sync(mask, p) int(::emu::warp_collective(__LINE__, ::emu::Collective::kAll, (mask), (p) ? 1 : 0, 0, 32))

namespace emu {
constexpr unsigned detail_mask() { return 0xffffffffu; }
constexpr unsigned detail_mask(unsigned m) { return m; }
constexpr int detail_width() { return 32; }
constexpr int detail_width(int w) { return w; }
constexpr size_t detail_zfill() { return 0; }
constexpr size_t detail_zfill(size_t z) { return z; }
}  // namespace emu

// Programmatic dependent launch (sm_90): the attribute of cudaLaunchKernelEx and the kernels' portable
// names for griddepcontrol (csrc/kernel_primitives.cuh). Launches run one after another here, so the
// wait has nothing to wait for; the launch log notes which launches asked for the attribute and how
// many threads passed the wait (EmulatedKernels.launch_records).
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 5 };
union cudaLaunchAttributeValue {
  char pad[64];
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {  // CUDA's field order; gridDim and blockDim are macros here (the built-ins)
  dim3 grid, block;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};
namespace emu {
void mark_programmatic_launch();  // the next launch asked for programmatic stream serialization
void grid_dependency_wait();      // counted per launch
void grid_dependents_launch();
}  // namespace emu
template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization &&
        config->attrs[i].val.programmaticStreamSerializationAllowed) {
      ::emu::mark_programmatic_launch();
    }
  }
  ::emu::launch(kernel, config->grid, config->block, config->dynamicSmemBytes, config->stream)(std::forward<A>(args)...);
  return cudaPeekAtLastError();
}
inline void grid_dependency_wait() { ::emu::grid_dependency_wait(); }
inline void grid_dependents_launch() { ::emu::grid_dependents_launch(); }

// Memory ordering is sequential in the emulator: fences have nothing to do.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __trap() { ::emu::fatal("__trap() called"); }
#define __pipeline_memcpy_async(dst, src, bytes, ...) \
  ::emu::pipeline_memcpy_async((dst), (src), (bytes), ::emu::detail_zfill(__VA_ARGS__))
#define __pipeline_commit() ::emu::pipeline_commit()
#define __pipeline_wait_prior(n) ::emu::pipeline_wait_prior(n)

// ---------------------------------------------------------------------------------------------
// Loads with cache hints are plain loads.
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------------
// Math and bit intrinsics.
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
using std::fmaf;
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frsqrt_rn(float a) { return 1.f / std::sqrt(a); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : (a == a ? a : 0.f)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float v) { unsigned i; std::memcpy(&i, &v, 4); return i; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
