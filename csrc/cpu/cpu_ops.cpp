// The `linearpatch_cpu` operators, registered for the CPU dispatch key through the libtorch stable
// ABI (TORCH_TARGET_VERSION = 2.10: one binary loads in every torch >= 2.10, CPU-only or CUDA):
//
//   linearpatch_cpu::hadamard_transform(Tensor x, Tensor h_k, float scale) -> Tensor
//   linearpatch_cpu::hadamard_patch(Tensor x, Tensor h_k, Tensor scale) -> Tensor
//   linearpatch_cpu::patch_add_rmsnorm(Tensor residual, Tensor update, Tensor h_k, Tensor scale,
//                                      Tensor norm_weight, float eps) -> (Tensor, Tensor)
//   linearpatch_cpu::isa_info() -> str         "selected=avx512;supported=avx512,avx2,scalar;compiled=..."
//   linearpatch_cpu::set_isa(str name) -> str  force "avx512" | "avx2" | "neon" | "scalar", or "auto"
//
// with the same math and arguments as the linearpatch_cuda operators (hadamard_ops.cpp): h_k is the
// K x K +-1 factor of H_d = H_K (x) H_N as fp32 ([[1.]] for powers of two). The public
// linearpatch::* ops (linearpatch_kernels/ops.py) validate, handle autograd and fake tensors, and
// call these when the cpu backend is chosen.
//
// Instruction sets: every file of cpu_*.cpp is compiled into the library for its own target; the
// widest one the running CPU supports is chosen at load (CPUID; LINEARPATCH_CPU_ISA=... or set_isa
// to force a narrower one, e.g. to test it). A row whose power-of-two part N = d / K is shorter than
// the chosen vector takes the next narrower set that fits it (scalar at the end).
//
// Threads: rows are cut into chunks of about kChunkBytes of input, taken one at a time from a shared
// counter by the calling thread and up to torch.get_num_threads() - 1 workers of this library's own
// pool. The caller waits only for the chunks other threads have taken, never for a worker to start:
// a worker that the OS has not scheduled yet (another process on the same cores) finds nothing left
// when it runs, and one descheduled in a chunk holds up that chunk only. Workers leave the last
// quarter of the chunks to the caller, so a worker's last chunk was taken while the caller still
// had that quarter to do, time for a descheduled worker to run again before the caller waits. So a busy machine slows a
// call down smoothly, and two threads are not slower than one, unlike a fork-join region (OpenMP,
// torch's parallel_for), whose end waits for every thread to arrive. Workers sleep on a condition
// variable between calls (no spinning that would take a busy machine's cycles).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <unistd.h>
#endif

#include "cpu_kernels.h"

namespace linearpatch_cpu {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---- Instruction sets -------------------------------------------------------------------------------

struct Isa {
  const char* name;
  const IsaKernels* kernels;  // nullptr: not compiled for this architecture
  bool supported;             // the running CPU (and OS) can execute it
};

bool x86_has(const char* feature) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  (void)feature;
#endif
  return false;
}

// F16C has no __builtin_cpu_supports name in older compilers: CPUID leaf 1, ECX bit 29.
bool x86_has_f16c() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  unsigned eax, ebx, ecx, edx;
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
  return (ecx >> 29) & 1;
#else
  return false;
#endif
}

// Widest first. Each entry's supported flag is fixed at load.
const std::vector<Isa>& isa_chain() {
  static const std::vector<Isa> chain = [] {
    const bool f16c = x86_has_f16c();
    std::vector<Isa> c;
    c.push_back({"avx512", avx512_kernels(), avx512_kernels() != nullptr && x86_has("avx512") && f16c});
    c.push_back({"avx2", avx2_kernels(), avx2_kernels() != nullptr && x86_has("avx2") && f16c});
    c.push_back({"neon", neon_kernels(), neon_kernels() != nullptr});
    c.push_back({"scalar", scalar_kernels(), true});
    return c;
  }();
  return chain;
}

std::string names(bool (*pick)(const Isa&)) {
  std::string out;
  for (const Isa& isa : isa_chain()) {
    if (!pick(isa)) continue;
    if (!out.empty()) out += ",";
    out += isa.name;
  }
  return out;
}

std::string supported_names() { return names([](const Isa& i) { return i.supported; }); }
std::string compiled_names() { return names([](const Isa& i) { return i.kernels != nullptr; }); }

// Index into isa_chain() of the widest set that may be used; -1 for a bad LINEARPATCH_CPU_ISA
// (reported by the first op call).
int resolve_isa(const std::string& name, std::string* error) {
  const auto& chain = isa_chain();
  if (name.empty() || name == "auto") {
    for (size_t i = 0; i < chain.size(); ++i)
      if (chain[i].supported) return int(i);
  }
  for (size_t i = 0; i < chain.size(); ++i) {
    if (name != chain[i].name) continue;
    if (chain[i].supported) return int(i);
    *error = "instruction set '" + name + "' is " + (chain[i].kernels == nullptr ? "not compiled for this architecture" : "not supported by this CPU") +
             "; supported here: " + supported_names() + " (or auto)";
    return -1;
  }
  *error = "unknown instruction set '" + name + "'; choose one of auto, avx512, avx2, neon, scalar (supported here: " +
           supported_names() + ")";
  return -1;
}

std::string g_env_error;
std::atomic<int> g_isa{[] {
  const char* env = std::getenv("LINEARPATCH_CPU_ISA");
  std::string error;
  const int i = resolve_isa(env != nullptr ? env : "", &error);
  if (i < 0) g_env_error = "LINEARPATCH_CPU_ISA=" + std::string(env) + ": " + error;
  return i;
}()};

// The kernels for rows whose power-of-two part has n values: the selected set, or the widest
// narrower supported one whose vector fits.
const IsaKernels* kernels_for(int64_t n, const char* op) {
  const int top = g_isa.load(std::memory_order_relaxed);
  STD_TORCH_CHECK(top >= 0, op, ": ", g_env_error);
  const auto& chain = isa_chain();
  for (size_t i = size_t(top); i < chain.size(); ++i)
    if (chain[i].supported && chain[i].kernels->width <= n) return chain[i].kernels;
  return scalar_kernels();
}

std::string isa_info() {
  const int top = g_isa.load();
  return std::string("selected=") + (top >= 0 ? isa_chain()[size_t(top)].name : "invalid") +
         ";supported=" + supported_names() + ";compiled=" + compiled_names();
}

std::string set_isa(std::string name) {
  std::string error;
  const int i = resolve_isa(name, &error);
  STD_TORCH_CHECK(i >= 0, "linearpatch_cpu::set_isa: ", error);
  g_isa.store(i);
  return isa_chain()[size_t(i)].name;
}

// ---- Arguments ----------------------------------------------------------------------------------------

DType dtype_of(const Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default:
      STD_TORCH_CHECK(false, op, ": x must be float32, float16 or bfloat16 (float64 runs on the torch backend)");
  }
  return DType::kFloat32;
}

int log2_exact(int64_t n) {
  int m = 0;
  while ((int64_t(1) << m) < n) ++m;
  return (int64_t(1) << m) == n ? m : -1;
}

struct RowShape {
  DType dtype;
  int64_t d;
  int64_t rows;
  int k;
  int log2_n;
};

RowShape check_rows(const char* op, const Tensor& x, const Tensor& h_k) {
  STD_TORCH_CHECK(x.is_cpu(), op, ": x must be a CPU tensor");
  STD_TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const DType dtype = dtype_of(x, op);
  const int64_t d = x.size(x.dim() - 1);
  STD_TORCH_CHECK(d >= 1, op, ": the last dim of x is empty");
  STD_TORCH_CHECK(h_k.is_cpu() && h_k.scalar_type() == ScalarType::Float && h_k.dim() == 2 &&
                      h_k.size(0) == h_k.size(1) && h_k.is_contiguous(),
                  op, ": h_k must be a contiguous square float32 CPU matrix");
  const int64_t k = h_k.size(0);
  STD_TORCH_CHECK(k == 1 || (k % 4 == 0 && k <= 256), op, ": K = ", k, " must be 1 or a multiple of 4 up to 256");
  STD_TORCH_CHECK(d % k == 0, op, ": last dim ", d, " is not a multiple of K = ", k);
  const int log2_n = log2_exact(d / k);
  STD_TORCH_CHECK(log2_n >= 0, op, ": d / K = ", d / k, " must be a power of two");
  return RowShape{dtype, d, x.numel() / d, int(k), log2_n};
}

// A float32 vector of length d on the CPU: its values, contiguous.
const float* checked_vector(const char* op, const char* name, const Tensor& v, int64_t d, Tensor* keep) {
  STD_TORCH_CHECK(v.is_cpu() && v.scalar_type() == ScalarType::Float && v.dim() == 1 && v.size(0) == d, op, ": ", name,
                  " must be a float32 CPU vector of length ", d);
  *keep = v.is_contiguous() ? v : torch::stable::contiguous(v);
  return static_cast<const float*>(keep->data_ptr());
}

// The rows of x as (base, row stride): in place where the leading dims collapse into one row stride
// and each row is contiguous (slices, transposes of the leading dims, any alignment), else a
// contiguous copy.
const void* row_view(const Tensor& x, int64_t* row_stride, Tensor* keep) {
  const int64_t dim = x.dim();
  bool ok = x.size(dim - 1) == 1 || x.stride(dim - 1) == 1;
  int64_t stride = x.size(dim - 1);  // the row stride of a single row: unused
  bool have = false;
  // Walking the leading dims from the innermost: each must step by the rows it spans.
  int64_t span = 1;
  for (int64_t i = dim - 2; ok && i >= 0; --i) {
    if (x.size(i) == 1) continue;
    if (!have) {
      stride = x.stride(i);
      have = true;
    } else {
      ok = x.stride(i) == stride * span;
    }
    span *= x.size(i);
  }
  if (ok) {
    *row_stride = stride;
    *keep = x;
    return x.data_ptr();
  }
  *keep = torch::stable::contiguous(x);
  *row_stride = x.size(dim - 1);
  return keep->data_ptr();
}

Tensor empty_rows(const Tensor& x) {
  std::vector<int64_t> sizes(size_t(x.dim()));
  for (int64_t i = 0; i < x.dim(); ++i) sizes[size_t(i)] = x.size(i);
  return torch::stable::empty(sizes, x.scalar_type(), std::nullopt, x.device());
}

// An output of 32 MiB or more is a fresh mapping of its own on every call (glibc maps allocations at or
// above its largest mmap threshold, 32 MiB on 64-bit, and unmaps them when freed): asking for 2 MiB
// pages before the first write makes the kernel fault in 16 pages instead of 8192 for 32 MiB, which
// otherwise costs more than the op itself on a virtual machine. Smaller outputs usually come from
// reused heap memory that is faulted in already. Only a hint (ignored where THP is off);
// LINEARPATCH_CPU_HUGEPAGES=0 turns it off.
const bool g_huge_pages = [] {
  const char* env = std::getenv("LINEARPATCH_CPU_HUGEPAGES");
  return env == nullptr || std::strcmp(env, "0") != 0;
}();

void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!g_huge_pages || bytes < (size_t(32) << 20)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Inputs of at least this many bytes are read with the kernels' prefetch of the next row
// (cpu_kernels_impl.h): past the L2 of a core (1-2 MiB) they come from L3 or memory. On a smaller input
// the prefetches find the lines in cache and only cost instructions.
constexpr int64_t kPrefetchBytes = int64_t(4) << 20;

// ---- Running rows in parallel ------------------------------------------------------------------------

constexpr int64_t kChunkBytes = int64_t(256) << 10;   // input bytes per chunk taken by a thread
constexpr int64_t kParallelBytes = int64_t(1) << 20;  // below this, one thread

struct Job {
  const IsaKernels* kernels;
  const RowArgs* args;
  int64_t rows, chunk, chunks;
  int64_t worker_limit;  // workers take no chunk at or past this index: the caller's reserve
  std::atomic<int64_t> next{0};

  void run(int64_t c) { kernels->rows(*args, c * chunk, std::min(rows, (c + 1) * chunk)); }

  // The caller takes chunks until none is left.
  void work_caller() {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) run(c);
  }

  // A worker takes chunks while more than the reserve is left, so that the chunk it holds last was
  // taken while the caller still had the reserve to do: a worker descheduled in that chunk has the
  // reserve's time to be scheduled again before the caller waits for it.
  void work_worker() {
    for (int64_t c = next.load(); c < worker_limit;) {
      if (next.compare_exchange_weak(c, c + 1)) {
        run(c);
        c = next.load();
      }
    }
  }
};

#if defined(__unix__) || defined(__APPLE__)
// A condition variable on pthreads: libstdc++ of GCC >= 12 exports std::condition_variable::wait at
// GLIBCXX_3.4.30, beyond what manylinux_2_28 allows (3.4.24); pthread_cond_wait is in every glibc.
class CondVar {
 public:
  CondVar() { pthread_cond_init(&cond_, nullptr); }
  CondVar(const CondVar&) = delete;
  CondVar& operator=(const CondVar&) = delete;
  template <class Predicate>
  void wait(std::unique_lock<std::mutex>& lock, Predicate ready) {
    while (!ready()) pthread_cond_wait(&cond_, lock.mutex()->native_handle());
  }
  void notify_all() { pthread_cond_broadcast(&cond_); }

 private:
  pthread_cond_t cond_;
};
#else
using CondVar = std::condition_variable;
#endif

// Worker threads that join a job while it is published; the caller waits for those inside it only.
class Pool {
 public:
  // The pool of this process (a child after fork() makes its own: the parent's threads are gone).
  static Pool& get() {
    static std::mutex guard;
    static Pool* pool = nullptr;
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || pool->pid_ != current_pid()) pool = new Pool();  // never destroyed: detached threads use it
    return *pool;
  }

  void run(Job& job, int64_t threads) {
    grow(threads - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      ++generation_;
    }
    wake_.notify_all();
    job.work_caller();
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = nullptr;  // a worker that wakes from now on finds no job
    idle_.wait(lock, [this] { return inside_ == 0; });
  }

 private:
  static long current_pid() {
#if defined(__unix__) || defined(__APPLE__)
    return long(getpid());
#else
    return 0;
#endif
  }

  void grow(int64_t workers) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (started_ < workers) {
      std::thread([this] { loop(); }).detach();
      ++started_;
    }
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen && job_ != nullptr; });
      seen = generation_;
      Job* job = job_;
      ++inside_;
      lock.unlock();
      job->work_worker();
      lock.lock();
      if (--inside_ == 0) idle_.notify_all();
    }
  }

  long pid_ = current_pid();
  std::mutex mutex_;
  CondVar wake_, idle_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  int64_t inside_ = 0, started_ = 0;
};

void run_rows(const IsaKernels* kernels, const RowArgs& args, int64_t rows, int64_t element_bytes) {
  const int64_t row_bytes = args.d * element_bytes * (args.op == Op::kEpilogue ? 2 : 1);
  const int64_t threads = int64_t(torch::stable::get_num_threads());
  if (threads <= 1 || rows < 2 || rows * row_bytes < kParallelBytes) {
    kernels->rows(args, 0, rows);
    return;
  }
  Job job;
  job.kernels = kernels;
  job.args = &args;
  job.rows = rows;
  job.chunk = std::max<int64_t>(1, kChunkBytes / row_bytes);
  job.chunks = (rows + job.chunk - 1) / job.chunk;
  job.worker_limit = job.chunks - job.chunks / 4;
  Pool::get().run(job, std::min(threads, job.chunks));
}

Tensor run_one(const char* op, Op kind, const Tensor& x, const Tensor& h_k, const Tensor* scale, double transform_scale) {
  const RowShape shape = check_rows(op, x, h_k);
  Tensor y = empty_rows(x);
  if (shape.rows == 0) return y;
  RowArgs args{};
  args.op = kind;
  args.dtype = shape.dtype;
  Tensor keep_x, keep_h = h_k, keep_s;
  args.x = row_view(x, &args.x_stride, &keep_x);
  args.y = y.data_ptr();
  args.h_k = static_cast<const float*>(h_k.data_ptr());
  args.k = shape.k;
  args.log2_n = shape.log2_n;
  args.d = shape.d;
  args.out_scale = float(transform_scale);
  std::unique_ptr<float[]> scale_over_d;
  if (scale != nullptr) {
    // P = H diag(s) H^T with orthonormal H = H_d / sqrt(d): both 1/sqrt(d) go into s once per call.
    const float* s = checked_vector(op, "scale", *scale, shape.d, &keep_s);
    scale_over_d.reset(new float[size_t(shape.d)]);
    const float inv_d = float(1.0 / double(shape.d));
    for (int64_t i = 0; i < shape.d; ++i) scale_over_d[size_t(i)] = s[i] * inv_d;
    args.scale = scale_over_d.get();
  }
  const int64_t element_bytes = int64_t(x.element_size());
  args.prefetch = shape.rows * shape.d * element_bytes >= kPrefetchBytes;
  advise_huge_pages(y.data_ptr(), size_t(shape.rows * shape.d * element_bytes));
  run_rows(kernels_for(int64_t(1) << shape.log2_n, op), args, shape.rows, element_bytes);
  return y;
}

Tensor hadamard_transform_cpu(const Tensor& x, const Tensor& h_k, double scale) {
  return run_one("linearpatch_cpu::hadamard_transform", Op::kTransform, x, h_k, nullptr, scale);
}

Tensor hadamard_patch_cpu(const Tensor& x, const Tensor& h_k, const Tensor& scale) {
  return run_one("linearpatch_cpu::hadamard_patch", Op::kPatch, x, h_k, &scale, 1.0);
}

float bf16_to_float(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    const float v = float(mant) * 5.9604644775390625e-8f;  // mant * 2**-24
    std::memcpy(&u, &v, 4);
    u |= sign;
  } else {
    u = sign | (exp == 31 ? 0x7f800000u | (mant << 13) : ((exp + 112) << 23) | (mant << 13));
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::tuple<Tensor, Tensor> patch_add_rmsnorm_cpu(const Tensor& residual, const Tensor& update, const Tensor& h_k,
                                                 const Tensor& scale, const Tensor& norm_weight, double eps) {
  const char* op = "linearpatch_cpu::patch_add_rmsnorm";
  const RowShape shape = check_rows(op, residual, h_k);
  STD_TORCH_CHECK(update.is_cpu() && update.scalar_type() == residual.scalar_type(), op,
                  ": update must be a CPU tensor of residual's dtype");
  bool same_shape = update.dim() == residual.dim();
  for (int64_t i = 0; same_shape && i < residual.dim(); ++i) same_shape = update.size(i) == residual.size(i);
  STD_TORCH_CHECK(same_shape, op, ": update must have residual's shape");
  STD_TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite non-negative number, got ", eps);
  const ScalarType wt = norm_weight.scalar_type();
  STD_TORCH_CHECK(norm_weight.is_cpu() && norm_weight.dim() == 1 && norm_weight.size(0) == shape.d &&
                      (wt == ScalarType::Float || wt == ScalarType::BFloat16 || wt == ScalarType::Half),
                  op, ": norm_weight must be a float32, bfloat16 or float16 CPU vector of length ", shape.d);
  Tensor h = empty_rows(residual), normed = empty_rows(residual);
  if (shape.rows == 0) return std::make_tuple(h, normed);

  Tensor keep_x, keep_u, keep_s;
  RowArgs args{};
  args.op = Op::kEpilogue;
  args.dtype = shape.dtype;
  args.x = row_view(residual, &args.x_stride, &keep_x);
  args.update = row_view(update, &args.u_stride, &keep_u);
  args.y = h.data_ptr();
  args.normed = normed.data_ptr();
  args.h_k = static_cast<const float*>(h_k.data_ptr());
  args.k = shape.k;
  args.log2_n = shape.log2_n;
  args.d = shape.d;
  args.eps = float(eps);
  // s / d and the weight as fp32, once per call (d values each).
  std::unique_ptr<float[]> vectors(new float[2 * size_t(shape.d)]);
  const float* s = checked_vector(op, "scale", scale, shape.d, &keep_s);
  const float inv_d = float(1.0 / double(shape.d));
  for (int64_t i = 0; i < shape.d; ++i) vectors[size_t(i)] = s[i] * inv_d;
  const Tensor w = norm_weight.is_contiguous() ? norm_weight : torch::stable::contiguous(norm_weight);
  float* weight = vectors.get() + shape.d;
  for (int64_t i = 0; i < shape.d; ++i) {
    if (wt == ScalarType::Float) weight[i] = static_cast<const float*>(w.data_ptr())[i];
    else if (wt == ScalarType::BFloat16) weight[i] = bf16_to_float(static_cast<const uint16_t*>(w.data_ptr())[i]);
    else weight[i] = half_to_float(static_cast<const uint16_t*>(w.data_ptr())[i]);
  }
  args.scale = vectors.get();
  args.weight = weight;
  const int64_t element_bytes = int64_t(residual.element_size());
  args.prefetch = 2 * shape.rows * shape.d * element_bytes >= kPrefetchBytes;
  advise_huge_pages(h.data_ptr(), size_t(shape.rows * shape.d * element_bytes));
  advise_huge_pages(normed.data_ptr(), size_t(shape.rows * shape.d * element_bytes));
  run_rows(kernels_for(int64_t(1) << shape.log2_n, op), args, shape.rows, element_bytes);
  return std::make_tuple(h, normed);
}

}  // namespace
}  // namespace linearpatch_cpu

STABLE_TORCH_LIBRARY(linearpatch_cpu, m) {
  m.def("hadamard_transform(Tensor x, Tensor h_k, float scale) -> Tensor");
  m.def("hadamard_patch(Tensor x, Tensor h_k, Tensor scale) -> Tensor");
  m.def(
      "patch_add_rmsnorm(Tensor residual, Tensor update, Tensor h_k, Tensor scale, Tensor norm_weight, float eps)"
      " -> (Tensor, Tensor)");
  m.def("isa_info() -> str");
  m.def("set_isa(str name) -> str");
}

STABLE_TORCH_LIBRARY_IMPL(linearpatch_cpu, CPU, m) {
  m.impl("hadamard_transform", TORCH_BOX(&linearpatch_cpu::hadamard_transform_cpu));
  m.impl("hadamard_patch", TORCH_BOX(&linearpatch_cpu::hadamard_patch_cpu));
  m.impl("patch_add_rmsnorm", TORCH_BOX(&linearpatch_cpu::patch_add_rmsnorm_cpu));
}

STABLE_TORCH_LIBRARY_IMPL(linearpatch_cpu, CompositeExplicitAutograd, m) {
  m.impl("isa_info", TORCH_BOX(&linearpatch_cpu::isa_info));
  m.impl("set_isa", TORCH_BOX(&linearpatch_cpu::set_isa));
}
