// The launchers of the Hadamard and LinearPatch kernels: which kernel a (dtype, K, N, op) runs, its
// block, shared memory and persistent grid, worked out once per kernel instance and device; errors
// read before and after each launch. Host code only; the kernels live in one header per family:
//
//   kernel_primitives.cuh  what they share: the operators (Op), 16-byte vectors <-> fp32 registers,
//                          butterflies over register bits, shared memory <-> registers, row sums
//   row_kernel.cuh         K == 1, every N from 8 to 32768: a row in the registers of T threads,
//                          bits exchanged through shared-memory transposes (layouts L0/L1 there)
//   kfast_kernel.cuh       K > 1 at the hidden sizes of real models: H_K as compile-time +-1 adds over
//                          a shared-memory tile of rows (steps 1-6 there)
//   kron_kernel.cuh        the other K > 1 (K up to 252): rows in shared memory, H_K as 4 x 4 fp32 tiles
//
// A row x of length d = K * N (N = 2**m) is the K x N matrix X and x . H_d = vec(H_K X H_N); the
// patch is y = x . H_d diag(s) H_d / d (kernel_primitives.cuh has the notation). Each kernel is
// instantiated per operator (Op); hadamard_*.cu hold transform and patch, and patch_add_rmsnorm_*.cu
// the epilogue, so that they compile in parallel.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "hadamard_launch.h"
#include "kernel_primitives.cuh"
#include "kfast_kernel.cuh"
#include "kron_kernel.cuh"
#include "row_kernel.cuh"

namespace linearpatch_cuda {

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
  int64_t sms = 0;  // multiprocessors of the device (row_kernel's grid for few rows)
  bool programmatic = false;  // sm_90+: launch with programmatic stream serialization (row_kernel)
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
  // Programmatic dependent launch only where the kernel's code was compiled for sm_90 or later (its
  // grid_dependency_wait is then griddepcontrol.wait): code JIT-compiled from older PTX has no wait, and
  // launched that way it could read what the previous kernel is still writing.
  cudaFuncAttributes attributes{};
  e = cudaFuncGetAttributes(&attributes, kernel);
  if (e != cudaSuccess) return cuda_error("cudaFuncGetAttributes", e);
  setup.shape = shape;
  setup.resident_blocks = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  setup.sms = sms;
  // LINEARPATCH_CUDA_PDL=0 launches without it (to time both on a GPU).
  const char* pdl = std::getenv("LINEARPATCH_CUDA_PDL");
  setup.programmatic = attributes.ptxVersion >= 90 && !(pdl != nullptr && std::string(pdl) == "0");
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

// A launch, with programmatic stream serialization where `programmatic` (sm_90+): the kernel may then
// begin while the previous kernel in the stream finishes, and waits for it at its first global access
// (grid_dependency_wait in kernel_primitives.cuh), so that its launch and setup are not on the path.
template <typename... P, typename... A>
std::string launch_kernel(void (*kernel)(P...), bool programmatic, unsigned blocks, int threads, size_t smem,
                          void* stream, A... args) {
  if (programmatic) {
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    // {gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs}, in order (the emulator's
    // gridDim and blockDim are the kernels' built-ins, so the fields are not named here)
    cudaLaunchConfig_t config = {dim3(blocks), dim3(unsigned(threads)), smem, static_cast<cudaStream_t>(stream), attribute, 1};
    const cudaError_t e = cudaLaunchKernelEx(&config, kernel, args...);
    if (e != cudaSuccess) return cuda_error("cudaLaunchKernelEx", e);
    return {};
  }
  kernel<<<blocks, threads, smem, static_cast<cudaStream_t>(stream)>>>(args...);
  return {};
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
  // Few rows (decode): when one row per block needs no more blocks than the device has SMs, a block is
  // one row's T threads (a warp at least), so that no block computes empty rows beside its own and
  // every row has an SM to itself: the time is the latency of one block, not shared issue slots.
  // A row is not split across blocks: its transposes exchange values between all of its threads, which
  // across blocks would be a round trip through global memory and a grid-wide wait.
  constexpr int kOneRowThreads = row_one_row_threads<L>();
  const int64_t few_groups = (a.rows + kOneRowThreads / L::T - 1) / (kOneRowThreads / L::T);
  const int block_threads = err.empty() && few_groups <= setup.sms && kOneRowThreads < setup.shape.threads
                                ? kOneRowThreads : setup.shape.threads;
  const size_t smem = sizeof(float) * size_t(row_shared_floats<L, kOp>(block_threads));
  if (err.empty()) err = check_shared_memory(smem, setup);
  if (err.empty()) err = pending_error();
  if (!err.empty()) return err;
  const int64_t rows_per_iter = block_threads / L::T;
  const int64_t groups = (a.rows + rows_per_iter - 1) / rows_per_iter;
  const int64_t blocks = groups < setup.resident_blocks ? groups : setup.resident_blocks;
  err = launch_kernel(kernel, setup.programmatic, unsigned(blocks), block_threads, smem, a.stream, static_cast<const T*>(a.x),
                      static_cast<T*>(a.y), a.scale, a.rows, a.out_scale, epilogue_operands<T>(a));
  if (!err.empty()) return "hadamard row_kernel launch: " + err;
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
