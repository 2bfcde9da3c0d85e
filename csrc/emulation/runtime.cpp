// The emulated GPU: fibers for CUDA threads, a randomised block scheduler, barriers and warp
// collectives with divergence checks, NaN-filled shared memory with guard bands, and the runtime
// API stand-ins declared in include/emulated_cuda.h.
//
// One block runs at a time. Its threads run in rounds: each round takes the runnable threads in
// a fresh random order and runs each until it reaches a synchronisation point (a barrier, a warp
// collective, a cp.async wait) or exits. A barrier releases when every thread of the block has
// reached it at the same source line; a warp collective when every lane of its mask has reached it
// with the same mask, operation and line. Anything else (a lane missing from a mask, a thread
// exiting while others wait, two lines at once) stops the launch with a message that names the
// threads and lines involved; the launch then reports cudaErrorLaunchFailure and
// emu_last_diagnostic() says why.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "include/emulated_cuda.h"
#include "include/emulated_float16.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {

ThreadState* current = nullptr;

namespace {

// ------------------------------------------------------------------------------------------------
// Fibers. On x86-64 a hand-written switch (callee-saved registers and the stack pointer: a few ns;
// swapcontext would make a system call per switch); elsewhere ucontext.

#if defined(__x86_64__)
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch_stack
.type emu_switch_stack,@function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch_stack,.-emu_switch_stack
)");
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;  // one inaccessible page under each stack: overflow faults

struct Fiber {
  char* memory = nullptr;  // guard page + stack
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

enum class Wait { kRunnable, kBarrier, kCollective, kDone };

struct Thread : ThreadState {
  Fiber fiber;
  int linear = 0;  // x + y Dx + z Dx Dy
  Wait wait = Wait::kRunnable;
  int line = 0;  // where it waits
  uint64_t result = 0;
  int predicate = 0;
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes, zfill;  // the last zfill bytes are zeros, not read
    void perform() const {
      std::memcpy(dst, src, bytes - zfill);
      std::memset(static_cast<char*>(dst) + (bytes - zfill), 0, zfill);
    }
  };
  std::vector<std::vector<Copy>> pipeline{1};  // committed batches, then the open one (last)
};

// A warp collective in progress: the lanes of `mask` that have arrived and what they brought
// (kGather: `param` bytes per lane into `blob`, and where each lane wants all of them).
struct PendingCollective {
  Collective op;
  unsigned mask, arrived;
  int line, param, width;
  uint64_t values[32];
  std::vector<unsigned char> blob;
  void* outs[32];
};

const char* collective_name(Collective op) {
  switch (op) {
    case Collective::kShflIdx: return "__shfl_sync";
    case Collective::kShflUp: return "__shfl_up_sync";
    case Collective::kShflDown: return "__shfl_down_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kBallot: return "__ballot_sync";
    case Collective::kAny: return "__any_sync";
    case Collective::kAll: return "__all_sync";
    case Collective::kGather: return "a warp-wide matrix instruction (mma.sync / ldmatrix)";
  }
  return "?";
}

// ------------------------------------------------------------------------------------------------
// Emulated device and error state.

struct Device {
  int sm_count = 4;  // few multiprocessors: grids sized from the SM count loop over many rows
  int smem_optin = 232448;  // sm_90: 227 KiB per block
  int smem_per_sm = 233472;
  int cc_major = 9, cc_minor = 0;
  int occupancy_blocks = 2;  // what cudaOccupancyMaxActiveBlocksPerMultiprocessor answers
  uint64_t seed = 1;
  // Each distinct configuration (SM count, limits, capability) is another GPU to the launchers, so
  // that what they cache per device (block shape, shared-memory opt-in, resident blocks) is worked
  // out again, as on a machine with several GPUs.
  int ordinal = 0;
};
Device device;
std::map<std::tuple<int, int, int, int>, int> device_ordinals{{{4, 232448, 9, 0}, 0}};
cudaError_t last_error = cudaSuccess;
std::string diagnostic;                    // why the last failed launch failed
// cudaFuncAttributeMaxDynamicSharedMemorySize per (kernel, device ordinal): like the runtime, an
// attribute set for one device does not carry over to another.
std::map<std::pair<const void*, int>, int> max_dynamic_smem;
uint64_t launches = 0;
bool dry_run = false;  // record launches without running them

// What each launch asked for: the kernel's symbol, the grid, the block, its dynamic shared memory and
// its integer arguments (kNotInteger for the others).
struct LaunchRecord {
  std::string symbol;
  dim3 grid, block;
  size_t smem;
  std::vector<long long> int_args;
  bool programmatic = false;     // launched with programmatic stream serialization (cudaLaunchKernelEx)
  uint64_t dependency_waits = 0;  // threads that passed grid_dependency_wait (a real run)
};
std::vector<LaunchRecord> launch_log;
bool next_programmatic = false;

uint64_t rng_state = 1;
uint64_t next_random() {  // xorshift64*
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 2685821657736338717ull;
}

// ------------------------------------------------------------------------------------------------
// The running block.

constexpr size_t kSharedGuard = 256;  // bytes of fill on each side of dynamic shared memory
constexpr unsigned char kFill = 0xff;  // NaN in fp32/fp64/fp16/bf16

struct Block {
  std::vector<Thread> threads;
  int warps = 0;
  std::vector<std::vector<PendingCollective>> collectives;  // per warp
  int barrier_arrived = 0, barrier_line = 0, barrier_count = 0;
  int exited = 0;
  bool failed = false;
  // Shared memory: guard | dynamic | guard, then the static __shared__ arrays.
  std::vector<unsigned char> shared;
  size_t dynamic_bytes = 0;
  std::map<const void*, std::vector<unsigned char>> static_shared;
  const std::function<void()>* body = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_context;
#endif
};
Block block;
Thread* running = nullptr;

std::string where(const Thread& t) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u)", t.thread_idx.x, t.thread_idx.y,
                t.thread_idx.z, t.block_idx.x, t.block_idx.y, t.block_idx.z);
  return buf;
}

void switch_to_scheduler() {
  Thread* self = running;
#if defined(__x86_64__)
  emu_switch_stack(&self->fiber.sp, block.scheduler_sp);
#else
  swapcontext(&self->fiber.context, &block.scheduler_context);
#endif
  current = self;  // resumed
  running = self;
}

// Stop the block: record why, and leave the thread's fiber for good.
[[noreturn]] void fail(const std::string& why) {
  if (!block.failed) {
    block.failed = true;
    diagnostic = why;
  }
  running->wait = Wait::kDone;
  switch_to_scheduler();
  std::abort();  // never resumed
}

void fiber_main() {
  Thread* self = running;
  (*block.body)();
  // Flush cp.async copies never waited for (the kernel's exit waits for them on the GPU too).
  for (auto& batch : self->pipeline)
    for (auto& c : batch) c.perform();
  self->wait = Wait::kDone;
  ++block.exited;
  switch_to_scheduler();
  std::abort();
}

#if defined(__x86_64__)
extern "C" void emu_fiber_entry() { fiber_main(); }
#else
void fiber_entry_ucontext() { fiber_main(); }
#endif

// A fault inside a kernel (a wild pointer, a misaligned vector access, a fiber stack overflow) kills
// the process as it would kill the context on a GPU; first say which emulated thread it was.
char fault_message[160];
struct sigaction previous_segv, previous_bus;
void on_fault(int sig) {
  if (running != nullptr) {
    const Thread& t = *running;
    const int n = std::snprintf(fault_message, sizeof fault_message,
                                "emulation: signal %d in thread (%u,%u,%u) of block (%u,%u,%u)\n", sig, t.thread_idx.x,
                                t.thread_idx.y, t.thread_idx.z, t.block_idx.x, t.block_idx.y, t.block_idx.z);
    if (n > 0) (void)!write(2, fault_message, size_t(n));
  }
  // Then whatever handled the signal before (Python's faulthandler, or the default action).
  sigaction(SIGSEGV, &previous_segv, nullptr);
  sigaction(SIGBUS, &previous_bus, nullptr);
  raise(sig);
}

void install_fault_report() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  static char alt_stack[64 * 1024];  // the handler must not run on an overflowed fiber stack
  stack_t ss{};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_handler = on_fault;
  sa.sa_flags = SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &previous_segv);
  sigaction(SIGBUS, &sa, &previous_bus);
}

void start_fiber(Thread& t) {
  if (t.fiber.memory == nullptr) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "emulation: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, kGuardBytes, PROT_NONE);
    t.fiber.memory = static_cast<char*>(m);
  }
#if defined(__x86_64__)
  // The stack as emu_switch_stack leaves it: six saved registers, then the "return address"
  // (the entry), then a fake return address of the entry so that it starts with rsp = 8 mod 16.
  auto* top = reinterpret_cast<uintptr_t*>(t.fiber.memory + kGuardBytes + kStackBytes);
  *--top = 0;
  *--top = reinterpret_cast<uintptr_t>(&emu_fiber_entry);
  for (int i = 0; i < 6; ++i) *--top = 0;
  t.fiber.sp = top;
#else
  getcontext(&t.fiber.context);
  t.fiber.context.uc_stack.ss_sp = t.fiber.memory + kGuardBytes;
  t.fiber.context.uc_stack.ss_size = kStackBytes;
  t.fiber.context.uc_link = nullptr;
  makecontext(&t.fiber.context, fiber_entry_ucontext, 0);
#endif
}

void resume(Thread& t) {
  running = &t;
  current = &t;
#if defined(__x86_64__)
  emu_switch_stack(&block.scheduler_sp, t.fiber.sp);
#else
  swapcontext(&block.scheduler_context, &t.fiber.context);
#endif
  current = nullptr;
  running = nullptr;
}

std::string waiting_summary() {
  std::string out;
  int listed = 0;
  for (const Thread& t : block.threads) {
    if (t.wait == Wait::kDone) continue;
    if (listed++ == 6) {
      out += "; ...";
      break;
    }
    out += listed > 1 ? "; " : "";
    out += where(t) + (t.wait == Wait::kBarrier ? " waits at __syncthreads on line "
                                                 : " waits at a warp collective on line ") +
           std::to_string(t.line);
  }
  return out;
}

// Run one block to completion (or failure). Returns false on failure (diagnostic set).
bool run_block(dim3 block_idx, dim3 grid, dim3 dims, size_t smem, const std::function<void()>& body) {
  const int n = int(dims.x * dims.y * dims.z);
  block.threads.resize(n);
  block.warps = (n + 31) / 32;
  block.collectives.assign(block.warps, {});
  block.barrier_arrived = block.barrier_count = block.exited = 0;
  block.failed = false;
  block.body = &body;
  block.dynamic_bytes = smem;
  block.shared.assign(smem + 2 * kSharedGuard, kFill);
  block.static_shared.clear();
  for (int i = 0; i < n; ++i) {
    Thread& t = block.threads[i];
    t.linear = i;
    t.thread_idx = uint3{unsigned(i) % dims.x, (unsigned(i) / dims.x) % dims.y, unsigned(i) / (dims.x * dims.y)};
    t.block_idx = uint3{block_idx.x, block_idx.y, block_idx.z};
    t.block_dim = dims;
    t.grid_dim = grid;
    t.wait = Wait::kRunnable;
    t.pipeline.assign(1, {});
    start_fiber(t);
  }
  std::vector<int> order;
  while (block.exited < n && !block.failed) {
    order.clear();
    for (int i = 0; i < n; ++i)
      if (block.threads[i].wait == Wait::kRunnable) order.push_back(i);
    if (order.empty()) {
      block.failed = true;
      diagnostic = "deadlock: no thread can continue (" + waiting_summary() + ")";
      break;
    }
    for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[next_random() % (i + 1)]);
    for (int i : order) {
      resume(block.threads[i]);
      if (block.failed) break;
      // A thread that exits while others wait at a barrier can never be matched there.
      if (block.threads[i].wait == Wait::kDone && block.barrier_arrived > 0) {
        block.failed = true;
        diagnostic = "divergent __syncthreads: " + where(block.threads[i]) + " exited while " +
                     std::to_string(block.barrier_arrived) + " threads wait at the barrier on line " +
                     std::to_string(block.barrier_line);
        break;
      }
    }
  }
  if (!block.failed) {
    for (size_t i = 0; i < kSharedGuard; ++i) {
      if (block.shared[i] != kFill || block.shared[kSharedGuard + smem + i] != kFill) {
        block.failed = true;
        diagnostic = "a write outside the " + std::to_string(smem) + " bytes of dynamic shared memory (" +
                     (block.shared[i] != kFill ? "before" : "after") + " the start)";
        break;
      }
    }
  }
  if (block.failed) {
    char buf[64];
    std::snprintf(buf, sizeof buf, " [block (%u,%u,%u)]", block_idx.x, block_idx.y, block_idx.z);
    diagnostic += buf;
  }
  return !block.failed;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Synchronisation points (called from inside a fiber).

void fatal(const char* what) { fail(where(*running) + ": " + what); }

static void check_in_kernel(const char* what) {
  if (running == nullptr) {
    std::fprintf(stderr, "emulation: %s called outside a kernel\n", what);
    std::abort();
  }
}

static void barrier_arrive(int line, int predicate) {
  check_in_kernel("__syncthreads");
  Thread& self = *running;
  if (block.barrier_arrived == 0) {
    block.barrier_line = line;
    block.barrier_count = 0;
  } else if (block.barrier_line != line) {
    fail("divergent __syncthreads: " + where(self) + " reached the barrier on line " + std::to_string(line) +
         " while others wait at the one on line " + std::to_string(block.barrier_line));
  }
  if (block.exited > 0) {
    fail("divergent __syncthreads: " + where(self) + " reached the barrier on line " + std::to_string(line) +
         " after " + std::to_string(block.exited) + " threads of its block exited");
  }
  self.line = line;
  block.barrier_count += predicate;
  if (++block.barrier_arrived == int(block.threads.size())) {
    block.barrier_arrived = 0;
    for (Thread& t : block.threads) {
      t.wait = Wait::kRunnable;
      t.predicate = block.barrier_count;
    }
  } else {
    self.wait = Wait::kBarrier;
  }
  // Always yield at a barrier: the order after it is random too.
  switch_to_scheduler();
}

void syncthreads(int line) { barrier_arrive(line, 0); }

int syncthreads_count(int line, int predicate) {
  barrier_arrive(line, predicate);
  return running->predicate;
}

// `param`: the lane's own offset, lane mask or (for __shfl_sync) source lane.
static uint64_t result_for_lane(const PendingCollective& c, int lane, int param) {
  const int width = c.width, base = lane & ~(width - 1);
  switch (c.op) {
    case Collective::kShflIdx: {
      const int src = base + (param & (width - 1));
      return (c.mask >> src) & 1u ? c.values[src] : c.values[lane];
    }
    case Collective::kShflUp: {
      const int src = lane - param;
      return src >= base ? c.values[src] : c.values[lane];
    }
    case Collective::kShflDown: {
      const int src = lane + param;
      return src < base + width ? c.values[src] : c.values[lane];
    }
    case Collective::kShflXor: {
      const int src = lane ^ param;
      return src < base + width && src >= base ? c.values[src] : c.values[lane];
    }
    case Collective::kGather:
      return 0;
    case Collective::kBallot:
    case Collective::kAny:
    case Collective::kAll: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if ((c.mask >> l) & 1u && c.values[l]) ballot |= 1u << l;
      if (c.op == Collective::kBallot) return ballot;
      if (c.op == Collective::kAny) return ballot != 0;
      return ballot == c.mask;
    }
  }
  return 0;
}

static uint64_t collective(int line, Collective op, unsigned mask, uint64_t value, int param, int width,
                           const void* gather_in, void* gather_out);

uint64_t warp_collective(int line, Collective op, unsigned mask, uint64_t value, int param, int width) {
  return collective(line, op, mask, value, param, width, nullptr, nullptr);
}

void warp_allgather(int line, unsigned mask, const void* in, size_t bytes, void* out) {
  collective(line, Collective::kGather, mask, 0, int(bytes), 32, in, out);
}

static uint64_t collective(int line, Collective op, unsigned mask, uint64_t value, int param, int width,
                           const void* gather_in, void* gather_out) {
  check_in_kernel(collective_name(op));
  Thread& self = *running;
  const int warp = self.linear / 32, lane = self.linear % 32;
  const int lanes_in_warp = std::min(32, int(block.threads.size()) - 32 * warp);
  if (!((mask >> lane) & 1u)) fail(std::string(collective_name(op)) + " on line " + std::to_string(line) + ": " + where(self) + " is not in its mask");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(std::string(collective_name(op)) + " on line " + std::to_string(line) + ": width " + std::to_string(width) + " is not a power of two <= 32");
  if (lanes_in_warp < 32 && (mask >> lanes_in_warp) != 0)
    fail(std::string(collective_name(op)) + " on line " + std::to_string(line) + ": the mask names lanes that the block does not have");
  auto& pending = block.collectives[warp];
  PendingCollective* c = nullptr;
  for (auto& p : pending) {
    if (!(p.mask & (1u << lane))) {
      if (p.mask & mask) {
        fail("divergent warp collective: " + where(self) + " calls " + collective_name(op) + " on line " + std::to_string(line) +
             " with mask " + std::to_string(mask) + " while lanes wait in " + collective_name(p.op) +
             " on line " + std::to_string(p.line) + " with the overlapping mask " + std::to_string(p.mask));
      }
      continue;
    }
    if (p.op != op || p.line != line || p.mask != mask || p.width != width ||
        (op != Collective::kShflIdx && p.param != param)) {
      fail("divergent warp collective: " + where(self) + " calls " + collective_name(op) + " on line " + std::to_string(line) +
           " while other lanes of its warp wait in " + collective_name(p.op) + " on line " + std::to_string(p.line) +
           (p.line == line ? " with a different mask, width or offset" : ""));
    }
    if (p.arrived & (1u << lane)) fail("internal error: a lane arrived twice at one collective");
    c = &p;
    break;
  }
  if (c == nullptr) {
    pending.push_back(PendingCollective{op, mask, 0u, line, param, width, {}, {}, {}});
    c = &pending.back();
    if (op == Collective::kGather) c->blob.assign(32 * size_t(param), 0);
  }
  if (op == Collective::kGather) {  // copied now: the lane's buffer may change once it runs again
    std::memcpy(c->blob.data() + size_t(lane) * size_t(param), gather_in, size_t(param));
    c->outs[lane] = gather_out;
  }
  // __shfl_sync reads the source lane's own index argument; keep it per lane.
  c->values[lane] = value;
  self.line = line;
  if (op == Collective::kShflIdx) {
    // Each lane may name a different source: resolve per lane when all have arrived.
    self.predicate = param;
  }
  c->arrived |= 1u << lane;
  if (c->arrived == c->mask) {
    for (int l = 0; l < 32; ++l) {
      if (!((c->mask >> l) & 1u)) continue;
      Thread& t = block.threads[32 * warp + l];
      if (op == Collective::kGather) std::memcpy(c->outs[l], c->blob.data(), c->blob.size());
      t.result = result_for_lane(*c, l, op == Collective::kShflIdx ? t.predicate : c->param);
      t.wait = Wait::kRunnable;
    }
    pending.erase(pending.begin() + (c - pending.data()));
  } else {
    self.wait = Wait::kCollective;
  }
  switch_to_scheduler();
  return self.result;
}

void syncwarp(int line, unsigned mask) { warp_collective(line, Collective::kBallot, mask, 0, 0, 32); }

// ------------------------------------------------------------------------------------------------
// Matrix instructions: an all-gather of the warp's fragments, then each lane computes its own part.

static double b16_value(uint16_t bits, MmaInput input) {
  return input == MmaInput::kBf16 ? double(bfloat16_bits_to_float(bits)) : double(half_bits_to_float(bits));
}

static uint16_t b16_half(uint32_t word, int i) { return uint16_t(i ? word >> 16 : word & 0xffffu); }

static void require_full_warp(const char* what, int line) {
  Thread& self = *running;
  const int warp = self.linear / 32;
  if (int(block.threads.size()) < 32 * (warp + 1))
    fail(std::string(what) + " on line " + std::to_string(line) + ": " + where(self) + " is in a warp of fewer than 32 threads");
}

void mma_m16n8k16(int line, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                  MmaInput input) {
  check_in_kernel("mma.sync");
  require_full_warp("mma.sync", line);
  struct Fragment {
    uint32_t a[4], b[2];
    float c[4];
  } mine{}, all[32];
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, c, sizeof mine.c);
  warp_allgather(line, 0xffffffffu, &mine, sizeof mine, all);
  // Where the PTX fragment layouts put each element (groupID = lane >> 2, threadID_in_group = lane % 4):
  //   A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register (k >= 8) * 2 + (r >= 8), half k % 2
  //   B[k][n]: lane n * 4 + (k % 8) / 2, register (k >= 8), half k % 2
  //   C[r][n]: lane (r % 8) * 4 + n / 2, element (r >= 8) * 2 + n % 2
  auto A = [&](int r, int k) {
    return b16_value(b16_half(all[(r % 8) * 4 + (k % 8) / 2].a[(k >= 8) * 2 + (r >= 8)], k % 2), input);
  };
  auto B = [&](int k, int n) { return b16_value(b16_half(all[n * 4 + (k % 8) / 2].b[k >= 8], k % 2), input); };
  const int lane = running->linear % 32, g = lane >> 2, t = lane & 3;
  // The sum as the tensor cores form it, not as PTX leaves it open (it promises no rounding mode):
  // measured on V100, T4 and A100 (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA
  // tensor cores", PeerJ Comput. Sci. 2021), the products are exact, every term is aligned to the
  // largest one's exponent with the bits below that one's 24th dropped (truncated), and the sum is
  // normalised to fp32 by truncation (round toward zero). Modelled here without the few extra
  // alignment bits some chips keep, so results are never more accurate than the hardware's: an
  // accuracy bound that holds here holds there. Terms on the grid of 2**(e_max - 23), at most 17 of
  // them below 2**(e_max + 1) each: the double sum of the truncated terms is exact.
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
    double terms[17];
    terms[0] = double(all[(r % 8) * 4 + n / 2].c[(r >= 8) * 2 + n % 2]);
    for (int k = 0; k < 16; ++k) terms[k + 1] = A(r, k) * B(k, n);  // exact: 8- or 11-bit significands
    double largest = 0.0, plain = 0.0;
    for (double x : terms) {
      largest = std::fmax(largest, std::fabs(x));
      plain += x;
    }
    if (!std::isfinite(plain) || largest == 0.0) {  // inf/nan propagate as in the plain sum; all zeros
      d[i] = float(plain);
      continue;
    }
    const double grid = std::ldexp(1.0, std::ilogb(largest) - 23);
    double sum = 0.0;
    for (double x : terms) sum += std::trunc(x / grid) * grid;
    float out = float(sum);
    // toward zero (an overflow stays inf, as the plain conversion gives it)
    if (std::isfinite(out) && std::fabs(double(out)) > std::fabs(sum)) out = std::nextafter(out, 0.0f);
    d[i] = out;
  }
}

void ldmatrix(int line, uint32_t* r, int count, const void* row_address, bool trans) {
  check_in_kernel("ldmatrix");
  require_full_warp("ldmatrix", line);
  if (count != 1 && count != 2 && count != 4) fatal("ldmatrix loads 1, 2 or 4 matrices");
  const int lane = running->linear % 32;
  uint16_t mine[8] = {}, rows[32][8];
  if (lane < 8 * count) {  // the other lanes' addresses are not used
    if (reinterpret_cast<uintptr_t>(row_address) % 16) fatal("ldmatrix: a row address that is not 16-byte aligned");
    std::memcpy(mine, row_address, sizeof mine);
  }
  warp_allgather(line, 0xffffffffu, mine, sizeof mine, rows);
  for (int j = 0; j < count; ++j) {
    const uint16_t(*m)[8] = rows + 8 * j;  // matrix j: rows 8 j .. 8 j + 7
    const int q = lane % 4, p = lane / 4;
    r[j] = trans ? uint32_t(m[2 * q][p]) | uint32_t(m[2 * q + 1][p]) << 16
                 : uint32_t(m[p][2 * q]) | uint32_t(m[p][2 * q + 1]) << 16;
  }
}

void* dynamic_shared_bytes() {
  check_in_kernel("extern __shared__");
  return block.shared.data() + kSharedGuard;
}

void* static_shared_bytes(const void* key, size_t bytes, size_t align) {
  check_in_kernel("__shared__");
  auto it = block.static_shared.find(key);
  if (it == block.static_shared.end()) it = block.static_shared.emplace(key, std::vector<unsigned char>(bytes + align, kFill)).first;
  auto p = reinterpret_cast<uintptr_t>(it->second.data());
  return reinterpret_cast<void*>((p + align - 1) / align * align);
}

void pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill) {
  check_in_kernel("__pipeline_memcpy_async");
  if (bytes != 4 && bytes != 8 && bytes != 16) fatal("__pipeline_memcpy_async copies 4, 8 or 16 bytes");
  if (zfill > bytes) fatal("__pipeline_memcpy_async zero-fills more bytes than it copies");
  if (reinterpret_cast<uintptr_t>(dst) % bytes || (zfill < bytes && reinterpret_cast<uintptr_t>(src) % bytes))
    fatal("__pipeline_memcpy_async with a pointer not aligned to the copy size");
  running->pipeline.back().push_back({dst, src, bytes, zfill});
}

void pipeline_commit() {
  check_in_kernel("__pipeline_commit");
  running->pipeline.emplace_back();
}

void pipeline_wait_prior(int pending) {
  check_in_kernel("__pipeline_wait_prior");
  auto& batches = running->pipeline;  // committed: all but the last (open) one
  const int committed = int(batches.size()) - 1;
  const int complete = std::max(0, committed - pending);
  for (int b = 0; b < complete; ++b)
    for (auto& c : batches[b]) c.perform();
  batches.erase(batches.begin(), batches.begin() + complete);
  switch_to_scheduler();  // let other threads run: their copies may still be in flight
}

// ------------------------------------------------------------------------------------------------
// Launch.

void mark_programmatic_launch() { next_programmatic = true; }
// Only kernels call these, after their launch was logged; the fibers of a launch run one at a time.
void grid_dependency_wait() { ++launch_log.back().dependency_waits; }
void grid_dependents_launch() {}

void run_kernel(const void* kernel, dim3 grid, dim3 dims, size_t smem, const std::function<void()>& body,
                std::vector<long long> int_args) {
  if (running != nullptr) {
    std::fprintf(stderr, "emulation: a kernel launched from inside a kernel\n");
    std::abort();
  }
  const uint64_t threads = uint64_t(dims.x) * dims.y * dims.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    diagnostic = "launch with " + std::to_string(threads) + " threads per block and grid (" + std::to_string(grid.x) + "," +
                 std::to_string(grid.y) + "," + std::to_string(grid.z) + ")";
    return;
  }
  auto attr = max_dynamic_smem.find({kernel, device.ordinal});
  const size_t allowed = attr == max_dynamic_smem.end() ? 48 * 1024 : size_t(attr->second);
  if (smem > allowed) {
    last_error = cudaErrorInvalidValue;
    diagnostic = "launch with " + std::to_string(smem) + " bytes of dynamic shared memory; the kernel allows " +
                 std::to_string(allowed) + " (cudaFuncAttributeMaxDynamicSharedMemorySize)";
    return;
  }
  Dl_info info{};
  const bool named = dladdr(kernel, &info) != 0 && info.dli_sname != nullptr;
  launch_log.push_back(LaunchRecord{named ? info.dli_sname : "?", grid, dims, smem, std::move(int_args)});
  launch_log.back().programmatic = next_programmatic;
  next_programmatic = false;
  if (dry_run) return;
  install_fault_report();
  rng_state = (device.seed ^ (0x9e3779b97f4a7c15ull * ++launches)) | 1;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  for (uint64_t i = blocks - 1; i > 0; --i) std::swap(order[i], order[next_random() % (i + 1)]);
  for (uint64_t b : order) {
    const dim3 idx(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y)));
    if (!run_block(idx, grid, dims, smem, body)) {
      last_error = cudaErrorLaunchFailure;
      return;
    }
  }
}

}  // namespace emu

// ------------------------------------------------------------------------------------------------
// Runtime API stand-ins.

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::last_error; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : "emulated launch failed (see the emulator's diagnostic)";
}

cudaError_t cudaGetDevice(int* d) {
  *d = emu::device.ordinal;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == emu::device.ordinal ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int d) {
  if (d != emu::device.ordinal) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = emu::device.sm_count; break;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::device.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = emu::device.cc_minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = emu::device.smem_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::device.smem_optin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > emu::device.smem_optin) return cudaErrorInvalidValue;
    emu::max_dynamic_smem[{func, emu::device.ordinal}] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  attr->ptxVersion = attr->binaryVersion = 10 * emu::device.cc_major + emu::device.cc_minor;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor_impl(int* blocks, const void*, int, size_t) {
  *blocks = emu::device.occupancy_blocks;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// ------------------------------------------------------------------------------------------------
// C interface for the driver.

extern "C" {

// Seed of the schedules, emulated SM count, opt-in shared memory per block (sm_90: 232448,
// sm_80: 166912), compute capability. Kernel attributes already set stay set for the device they
// were set on (as in a process whose launchers cache their attribute setup per device).
void emu_configure(uint64_t seed, int sm_count, int smem_optin, int cc_major, int cc_minor) {
  emu::device.seed = seed;
  emu::device.sm_count = sm_count;
  emu::device.smem_optin = smem_optin;
  emu::device.cc_major = cc_major;
  emu::device.cc_minor = cc_minor;
  const auto key = std::make_tuple(sm_count, smem_optin, cc_major, cc_minor);
  const auto known = emu::device_ordinals.find(key);
  emu::device.ordinal = known != emu::device_ordinals.end() ? known->second : int(emu::device_ordinals.size());
  emu::device_ordinals.emplace(key, emu::device.ordinal);
  emu::launches = 0;
}

// Launches are recorded (emu_launch_record) and, in a dry run, not executed.
void emu_set_dry_run(int on) { emu::dry_run = on != 0; }
void emu_clear_launch_log() { emu::launch_log.clear(); }
int emu_launch_count() { return int(emu::launch_log.size()); }
// The kernel symbol (mangled) of launch i; dims = grid x, y, z, block x, y, z; *smem = dynamic bytes.
const char* emu_launch_record(int i, unsigned* dims, uint64_t* smem) {
  const auto& r = emu::launch_log.at(size_t(i));
  const unsigned d[6] = {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z};
  std::copy(d, d + 6, dims);
  *smem = r.smem;
  return r.symbol.c_str();
}
// The integer arguments of launch i (up to `max`; INT64_MIN for an argument that is not an integer);
// returns how many arguments the kernel has.
int emu_launch_args(int i, long long* out, int max) {
  const auto& r = emu::launch_log.at(size_t(i));
  for (int j = 0; j < int(r.int_args.size()) && j < max; ++j) out[j] = r.int_args[size_t(j)];
  return int(r.int_args.size());
}

// Whether launch i asked for programmatic stream serialization; *waits = the threads that passed
// grid_dependency_wait while it ran (0 for a dry run).
int emu_launch_programmatic(int i, uint64_t* waits) {
  const auto& r = emu::launch_log.at(size_t(i));
  *waits = r.dependency_waits;
  return r.programmatic ? 1 : 0;
}

const char* emu_last_diagnostic() { return emu::diagnostic.c_str(); }
int emu_device_ordinal() { return emu::device.ordinal; }
void emu_clear_diagnostic() { emu::diagnostic.clear(); }

// The host conversions, for their own test against torch's.
void emu_convert_to_half(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = emu::float_to_half_bits(x[i]);
}
void emu_convert_to_bfloat16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = emu::float_to_bfloat16_bits(x[i]);
}
void emu_convert_from_half(const uint16_t* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = emu::half_bits_to_float(x[i]);
}

}  // extern "C"
