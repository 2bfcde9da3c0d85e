// The C++ CPU kernels timed alone, torch-free, through their raw-pointer interface (csrc/cpu/cpu_kernels.h):
// where the time of the ops goes, without the allocator, page faults or dispatch of the torch ops.
//
//   g++ -O3 -std=c++17 -Icsrc/cpu benchmarks/bench_cpu_rows.cpp csrc/cpu/cpu_{avx512,avx2,neon,scalar}.cpp
//       -o bench_cpu_rows && ./bench_cpu_rows [isa] [rows] [d]
//
// NO_PREFETCH=1 in the environment turns the prefetch of the next row off.
// Defaults: the widest set compiled for the architecture (not checked against this CPU: name a
// narrower one where it lacks AVX-512), 2048 rows, d = 4096.
//
// One thread, fp32, K = 1 (d a power of two). Per op (patch, transform), the median over the calls of:
//   memory:   inputs and outputs rotated over 8 preallocated, already written pairs of tensors in
//             2 MiB pages (the output lines are not in the core's caches: each is read before it is
//             written);
//   fresh:    a fresh 2 MiB-page mapping per call for the output (mmap, madvise, munmap inside the
//             time), the case of an op that returns a new tensor of 32 MiB or more;
//   in-L2:    the same work on 32 rows (512 KiB at d = 4096) over and over, without the prefetch
//             (as the ops run an input this small): the arithmetic alone.
// To compare two versions of the kernels, build this file against each checkout's csrc/cpu and run
// them one after the other (or interleave the runs); the machine's load moves every number.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

using namespace linearpatch_cpu;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median_ms(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2] * 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  const IsaKernels* kernels = nullptr;
  const char* want = argc > 1 ? argv[1] : "";
  for (const IsaKernels* k : {avx512_kernels(), avx2_kernels(), neon_kernels(), scalar_kernels()}) {
    if (k != nullptr && (want[0] == '\0' || std::strcmp(k->name, want) == 0)) {
      kernels = k;
      break;
    }
  }
  const int64_t rows = argc > 2 ? std::atoll(argv[2]) : 2048, d = argc > 3 ? std::atoll(argv[3]) : 4096;
  int log2_n = 0;
  while ((int64_t(1) << log2_n) < d) ++log2_n;
  if (kernels == nullptr || rows < 32 || (int64_t(1) << log2_n) != d || d < kernels->width) {
    std::fprintf(stderr, "usage: bench_cpu_rows [avx512|avx2|neon|scalar] [rows >= 32] [d: a power of two >= the "
                         "vector width]; the instruction set must be one compiled for this architecture\n");
    return 2;
  }
  const size_t n = size_t(rows * d), bytes = n * sizeof(float);
  constexpr int kPairs = 8, kCalls = 16;
  constexpr size_t kHuge = size_t(2) << 20;
  std::vector<float*> xs(kPairs), ys(kPairs);
  for (int i = 0; i < kPairs; ++i) {
    xs[i] = static_cast<float*>(std::aligned_alloc(kHuge, bytes));
    ys[i] = static_cast<float*>(std::aligned_alloc(kHuge, bytes));
    madvise(xs[i], bytes, MADV_HUGEPAGE);  // as the outputs of the ops: 2 MiB pages where the OS gives them
    madvise(ys[i], bytes, MADV_HUGEPAGE);
    for (size_t j = 0; j < n; ++j) xs[i][j] = float(j % 97) * 0.01f - 0.5f, ys[i][j] = 0.f;
  }
  std::vector<float> scale(size_t(d), 1.f / float(d));
  RowArgs a{};
  a.dtype = DType::kFloat32;
  a.x_stride = d;
  a.scale = scale.data();
  a.out_scale = 1.f / 64;
  a.k = 1;
  a.log2_n = log2_n;
  a.d = d;
  a.prefetch = std::getenv("NO_PREFETCH") == nullptr;  // as the ops ask for it on inputs of 4 MiB or more
  std::printf("%s, %lld rows x %lld fp32, one thread (median ms of %d calls)\n", kernels->name, (long long)rows,
              (long long)d, kCalls);
  for (const Op op : {Op::kPatch, Op::kTransform}) {
    a.op = op;
    std::vector<double> memory, fresh, l2;
    for (int c = 0; c < kCalls; ++c) {
      a.x = xs[c % kPairs];
      a.y = ys[(c + 3) % kPairs];
      double t = now();
      kernels->rows(a, 0, rows);
      memory.push_back(now() - t);

      t = now();
      void* map = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (map == MAP_FAILED) return 1;
      char* y = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(map) + kHuge - 1) & ~uintptr_t(kHuge - 1));
      madvise(y, bytes, MADV_HUGEPAGE);
      a.y = y;
      kernels->rows(a, 0, rows);
      munmap(map, bytes + kHuge);
      fresh.push_back(now() - t);

      a.x = xs[0];
      a.y = ys[0];
      const bool prefetch = a.prefetch;
      a.prefetch = false;  // what the ops do with an input this small
      t = now();
      for (int64_t r = 0; r + 32 <= rows; r += 32) kernels->rows(a, 0, 32);
      l2.push_back(now() - t);
      a.prefetch = prefetch;
    }
    std::printf("%-9s  memory %7.2f   fresh %7.2f   in-L2 %7.2f\n", op == Op::kPatch ? "patch" : "transform",
                median_ms(memory), median_ms(fresh), median_ms(l2));
  }
  return 0;
}
