// SIMT emulation runtime for batchbench.verify: runs a GPU kernel on the CPU.
//
// One block (threadgroup) at a time; each GPU thread is a fiber with its own stack, all on
// the calling OS thread. A fiber runs until it reaches a barrier or a warp/simdgroup
// collective, then the next runnable fiber resumes. This makes every run deterministic for
// a given schedule, so the harness can run the same launch under several schedules
// (thread order forward, reverse, shuffled) and demand identical bits: a missing barrier
// or a cross-lane read without a shuffle shows up as a schedule-dependent result.
// Blocks run one after another (order per schedule), so atomics are plain read-modify-writes
// and a "last block merges" counter works as on the GPU.
//
// Checked here (errors stop the launch with a message): barrier reached at different call
// sites or after some threads exited, collectives with mismatched masks or call sites,
// shuffles from exited lanes, deadlocks, segfaults (guard pages around every buffer and
// fiber stack), spin loops (CPU time limit), and reads of a cp.async destination before the
// wait that covers the copy (copies land only at that wait: async_copy).
// Not visible here: ordering between blocks (they never overlap), and memory ordering that
// a kernel gets from a shuffle or vote alone (here every collective orders memory between
// its lanes, as __syncwarp does; CUDA only promises that for __syncwarp).
#pragma once
#pragma GCC system_header

#include <csetjmp>
#include <cstdarg>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(BBEMU_UCONTEXT)
#define BBEMU_UCONTEXT 1
#endif
#if defined(BBEMU_UCONTEXT)
#include <ucontext.h>
#endif

namespace bbemu {

constexpr int kWarp = 32;
constexpr int kRecs = 64;         // collective records per warp (in flight or being read)
constexpr int kSlotBytes = 32;    // largest value one lane exchanges
constexpr int kMaxThreads = 1024; // threads per block

enum Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };
enum Dialect : int { kCuda = 0, kMetal = 1 };
enum FiberState : uint8_t { kRunnable, kAtBlock, kAtWarp, kDone };

struct U3 {
  unsigned x, y, z;
};

struct Fiber {
  void* sp;
  unsigned lin, lane, warp;
  U3 tid;
  uint8_t state;
  int wait_line;
  const char* wait_what;
  unsigned coll_mask; // participants of the last collective it completed
  int held;           // record of that collective, still being read (-1: none)
  int acp_n;          // asynchronous copies in flight (async_copy)
  int acp_commits;    // groups committed so far
#if defined(BBEMU_UCONTEXT)
  ucontext_t uc;
#endif
};

// One warp/simdgroup collective: the participants' values, kept until each has read them.
struct CollRec {
  unsigned mask;    // participants
  unsigned arrived;
  int kind;
  int line;
  const char* what;
  int state;        // 0 free, 1 gathering, 2 complete (being read)
  int readers;      // participants that have not released it yet
  alignas(16) unsigned char x[kWarp][kSlotBytes];
};

struct WarpState {
  unsigned exist; // lanes that exist (a partial Metal threadgroup has fewer)
  unsigned live;  // lanes not exited
  int nfree;
  int free_ids[kRecs];
  int ngather;
  int gather_ids[kRecs]; // records still gathering (disjoint masks)
  CollRec rec[kRecs];
};

// What a launch passes in (filled by the generated launcher / Python).
struct LaunchCfg {
  int64_t grid[3];  // in threads, as MLX takes it
  int64_t tg[3];    // threadgroup / block size as given
  int64_t dialect;  // kCuda / kMetal
  int64_t schedule; // kForward / kReverse / kRandom
  int64_t seed;
  int64_t strict;   // 1: barrier after exit etc. are errors
  int64_t cpu_limit_s;
  int64_t stack_kb;
};

struct Buffer {
  const char* name;
  uintptr_t lo, hi;     // the array's bytes
  uintptr_t map_lo, map_hi; // mapping including guard pages
};

// ---- global state (one kernel per shared library) -----------------------------------

inline Fiber g_fibers[kMaxThreads];
inline WarpState g_warps[kMaxThreads / kWarp];
inline Fiber* g_cur = nullptr;
inline void* g_main_sp = nullptr;
#if defined(BBEMU_UCONTEXT)
inline ucontext_t g_main_uc;
#endif
inline int g_runq[kMaxThreads + 1];
inline int g_rq_head = 0, g_rq_tail = 0; // ring of size kMaxThreads + 1
inline int g_nthreads = 0;
inline int g_live = 0;
inline int g_block_arrived = 0;
inline int g_block_line = 0;
inline const char* g_block_what = nullptr;
inline uint64_t g_block_gen = 0;
inline int g_exited = 0;
alignas(16) inline unsigned char g_block_x[2][kMaxThreads][8];
inline LaunchCfg g_cfg;
inline U3 g_bid, g_bdim, g_nblocks, g_dispatch_tg;
inline uint64_t g_rng = 1;
inline char g_err[2048];
inline bool g_failed = false;
inline void (*g_body)(void*) = nullptr;
inline void* g_body_ctx = nullptr;
inline char* g_stacks = nullptr;
inline size_t g_stack_bytes = 0, g_stacks_map = 0;
inline Buffer g_bufs[64];
inline int g_nbufs = 0;
inline uint64_t g_touch_gen = 1; // per-block generation for shared-memory poisoning
inline sigjmp_buf g_jmp;
inline volatile sig_atomic_t g_in_launch = 0;
inline volatile void* g_fault_addr = nullptr;
inline volatile int g_fault_sig = 0;

inline Fiber& cur() { return *g_cur; }

// Call-site line of an intrinsic, as a trailing default argument. A class (not an int) so
// that a call with one argument too many, e.g. simd_sum(x, 3), does not compile.
struct LocTag {
  explicit LocTag() = default;
};
struct Loc {
  int line;
  Loc(LocTag = LocTag(), int l = __builtin_LINE()) : line(l) {}
  operator int() const { return line; }
};

// ---- context switch ------------------------------------------------------------------

#if !defined(BBEMU_UCONTEXT)
extern "C" void bbemu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void bbemu_ctx_tramp();
asm(R"(
.text
.p2align 4
.hidden bbemu_ctx_switch
.globl bbemu_ctx_switch
.type bbemu_ctx_switch,@function
bbemu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size bbemu_ctx_switch,.-bbemu_ctx_switch
.p2align 4
.hidden bbemu_ctx_tramp
.globl bbemu_ctx_tramp
.type bbemu_ctx_tramp,@function
bbemu_ctx_tramp:
  movq %r12, %rdi
  callq *%r13
  ud2
.size bbemu_ctx_tramp,.-bbemu_ctx_tramp
)");
#endif

void fiber_main(Fiber* f);

inline void fiber_entry_c(Fiber* f) { fiber_main(f); }

#if defined(BBEMU_UCONTEXT)
inline void fiber_entry_uc(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

inline void init_fiber_stack(Fiber& f, char* stack_lo, size_t size) {
#if !defined(BBEMU_UCONTEXT)
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = reinterpret_cast<uint64_t>(&bbemu_ctx_tramp); // ret target, rsp 16-aligned after
  *--sp = 0;                                            // rbp
  *--sp = 0;                                            // rbx
  *--sp = reinterpret_cast<uint64_t>(&f);               // r12: argument
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry_c);   // r13: entry
  *--sp = 0;                                            // r14
  *--sp = 0;                                            // r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack_lo;
  f.uc.uc_stack.ss_size = size;
  f.uc.uc_link = nullptr;
  uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_entry_uc), 2,
              static_cast<unsigned>(p >> 32), static_cast<unsigned>(p & 0xffffffffu));
#endif
}

inline void switch_fiber(Fiber* from, Fiber* to) {
  g_cur = to;
#if !defined(BBEMU_UCONTEXT)
  bbemu_ctx_switch(from ? &from->sp : &g_main_sp, to->sp);
#else
  swapcontext(from ? &from->uc : &g_main_uc, &to->uc);
#endif
}

[[noreturn]] inline void switch_to_main(Fiber* from) {
  g_cur = nullptr;
#if !defined(BBEMU_UCONTEXT)
  bbemu_ctx_switch(&from->sp, g_main_sp);
#else
  swapcontext(&from->uc, &g_main_uc);
#endif
  __builtin_unreachable();
}

// ---- errors ---------------------------------------------------------------------------

inline void describe_thread(char* out, size_t n, const Fiber& f) {
  snprintf(out, n, "block (%u,%u,%u) thread (%u,%u,%u) [warp %u lane %u]", g_bid.x, g_bid.y,
           g_bid.z, f.tid.x, f.tid.y, f.tid.z, f.warp, f.lane);
}

// Record the first error and abandon the launch (back to the scheduler's caller).
[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void fail(const char* fmt, ...) {
  if (!g_failed) {
    g_failed = true;
    char who[160] = "";
    if (g_cur) {
      describe_thread(who, sizeof(who), *g_cur);
    }
    va_list ap;
    va_start(ap, fmt);
    char msg[1600];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(g_err, sizeof(g_err), "%s%s%s", msg, who[0] ? " -- at " : "", who);
  }
  if (g_cur) {
    switch_to_main(g_cur);
  }
  siglongjmp(g_jmp, 2);
}

// ---- scheduling ----------------------------------------------------------------------

inline uint64_t rng_next() {
  uint64_t x = g_rng;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return g_rng = x;
}

inline void rq_push(int i) {
  g_runq[g_rq_tail] = i;
  g_rq_tail = (g_rq_tail + 1) % (kMaxThreads + 1);
}

inline int rq_pop() {
  if (g_rq_head == g_rq_tail) {
    return -1;
  }
  int i = g_runq[g_rq_head];
  g_rq_head = (g_rq_head + 1) % (kMaxThreads + 1);
  return i;
}

// Make `ids[0..n)` runnable, ordered by the schedule.
inline void wake(int* ids, int n) {
  if (g_cfg.schedule == kReverse) {
    for (int i = n - 1; i >= 0; --i) {
      rq_push(ids[i]);
    }
    return;
  }
  if (g_cfg.schedule == kRandom) {
    for (int i = n - 1; i > 0; --i) {
      int j = static_cast<int>(rng_next() % static_cast<uint64_t>(i + 1));
      int t = ids[i];
      ids[i] = ids[j];
      ids[j] = t;
    }
  }
  for (int i = 0; i < n; ++i) {
    rq_push(ids[i]);
  }
}

inline void describe_waiters(char* out, size_t n) {
  size_t used = 0;
  int shown = 0;
  for (int i = 0; i < g_nthreads && shown < 6; ++i) {
    const Fiber& f = g_fibers[i];
    if ((f.state == kAtBlock || f.state == kAtWarp) && used < n) {
      used += snprintf(out + used, used < n ? n - used : 0, "%sthread %u waits at %s (line %d)",
                       shown ? "; " : "", f.lin, f.wait_what ? f.wait_what : "?", f.wait_line);
      ++shown;
    }
  }
}

// Give the OS thread to the next runnable fiber (possibly the caller itself).
inline void dispatch() {
  Fiber* self = g_cur;
  int next = rq_pop();
  if (next < 0) {
    bool all_done = true;
    for (int i = 0; i < g_nthreads; ++i) {
      if (g_fibers[i].state != kDone) {
        all_done = false;
      }
    }
    if (all_done) {
      switch_to_main(self);
    }
    char w[700];
    describe_waiters(w, sizeof(w));
    g_cur = nullptr; // the deadlock is not one thread's fault
    fail("deadlock: no thread can proceed (%s)", w);
  }
  Fiber* to = &g_fibers[next];
  if (to == self) {
    return;
  }
  switch_fiber(self, to);
}

// ---- block barrier -------------------------------------------------------------------

inline void complete_block_barrier() {
  int ids[kMaxThreads];
  int n = 0;
  for (int i = 0; i < g_nthreads; ++i) {
    if (g_fibers[i].state == kAtBlock) {
      g_fibers[i].state = kRunnable;
      ids[n++] = i;
    }
  }
  g_block_arrived = 0;
  g_block_gen++;
  wake(ids, n);
}

inline void block_barrier(const char* what, int line) {
  Fiber& f = cur();
  if (g_block_arrived == 0) {
    g_block_line = line;
    g_block_what = what;
    if (g_exited > 0 && g_cfg.strict) {
      fail("%s (line %d) reached after %d thread(s) of the block returned: undefined behaviour "
           "on the GPU (every thread must reach every barrier)", what, line, g_exited);
    }
  } else if (line != g_block_line) {
    fail("threads reach different barriers: %s at line %d vs %s at line %d (barrier in "
         "divergent control flow)", what, line, g_block_what, g_block_line);
  }
  f.state = kAtBlock;
  f.wait_what = what;
  f.wait_line = line;
  if (++g_block_arrived == g_live) {
    complete_block_barrier();
  }
  dispatch();
}

// Block-wide exchange of one int per thread (for __syncthreads_count and friends): returns
// the sum over the threads that took part.
inline int block_count(int v, const char* what, int line) {
  unsigned char (*slot)[8] = g_block_x[g_block_gen & 1];
  const uint32_t stamp = static_cast<uint32_t>(g_block_gen);
  memcpy(slot[cur().lin], &v, 4);
  memcpy(slot[cur().lin] + 4, &stamp, 4);
  block_barrier(what, line);
  int n = 0;
  for (int i = 0; i < g_nthreads; ++i) {
    int x;
    uint32_t st;
    memcpy(&x, slot[i], 4);
    memcpy(&st, slot[i] + 4, 4);
    if (st == stamp) {
      n += x;
    }
  }
  return n;
}

// ---- warp / simdgroup collectives ----------------------------------------------------

inline void release_held(Fiber& f) {
  if (f.held < 0) {
    return;
  }
  WarpState& w = g_warps[f.warp];
  CollRec& r = w.rec[f.held];
  f.held = -1;
  if (--r.readers == 0) {
    r.state = 0;
    w.free_ids[w.nfree++] = static_cast<int>(&r - w.rec);
  }
}

inline void drop_gathering(WarpState& w, int id) {
  for (int i = 0; i < w.ngather; ++i) {
    if (w.gather_ids[i] == id) {
      w.gather_ids[i] = w.gather_ids[--w.ngather];
      return;
    }
  }
}

inline void complete_collective(WarpState& w, int warp, int id) {
  CollRec& r = w.rec[id];
  drop_gathering(w, id);
  r.state = 2;
  r.readers = __builtin_popcount(r.mask);
  int ids[kWarp];
  int cnt = 0;
  for (int l = 0; l < kWarp; ++l) {
    if (r.mask & (1u << l)) {
      Fiber& g = g_fibers[warp * kWarp + l];
      g.state = kRunnable;
      g.coll_mask = r.mask;
      g.held = id;
      ids[cnt++] = static_cast<int>(g.lin);
    }
  }
  wake(ids, cnt);
}

// Every participating lane deposits `v` (n bytes); returns the slot row of all lanes
// (kSlotBytes apart) once every participant has arrived; valid until this lane's next
// collective. CUDA passes an explicit mask (disjoint masks may be in flight at once, e.g.
// 16-lane tiles); Metal uses the active lanes (all that exist and have not returned) and
// insists on one call site.
inline const unsigned char* warp_collective(unsigned mask, const void* v, size_t n, int kind,
                                            const char* what, int line) {
  Fiber& f = cur();
  WarpState& w = g_warps[f.warp];
  const unsigned me = 1u << f.lane;
  release_held(f);
  if (g_cfg.dialect == kMetal) {
    mask = w.live;
  } else {
    if (!(mask & me)) {
      fail("%s called by lane %u which is not in its mask 0x%08x", what, f.lane, mask);
    }
    if (mask & ~w.exist) {
      fail("%s mask 0x%08x names lanes that do not exist (0x%08x)", what, mask, w.exist);
    }
    if (mask & ~w.live) {
      fail("%s mask 0x%08x includes lane(s) 0x%08x that already returned", what, mask,
           mask & ~w.live);
    }
  }
  int id = -1;
  for (int i = 0; i < w.ngather; ++i) {
    CollRec& r = w.rec[w.gather_ids[i]];
    if (!(r.mask & mask)) {
      continue;
    }
    if (g_cfg.dialect == kMetal && (r.kind != kind || r.line != line)) {
      fail("simdgroup functions in divergent control flow: %s at line %d while lanes 0x%08x "
           "wait at %s, line %d", what, line, r.arrived, r.what, r.line);
    }
    if (r.kind != kind || r.mask != mask) {
      fail("warp collectives do not match: %s (mask 0x%08x, line %d) while lanes 0x%08x wait at "
           "%s (mask 0x%08x, line %d)", what, mask, line, r.arrived, r.what, r.mask, r.line);
    }
    id = w.gather_ids[i];
    break;
  }
  if (id < 0) {
    if (w.nfree == 0) {
      fail("internal: more than %d collectives in flight in one warp", kRecs);
    }
    id = w.free_ids[--w.nfree];
    CollRec& r = w.rec[id];
    r.mask = mask;
    r.arrived = 0;
    r.kind = kind;
    r.line = line;
    r.what = what;
    r.state = 1;
    w.gather_ids[w.ngather++] = id;
  }
  CollRec& r = w.rec[id];
  memcpy(r.x[f.lane], v, n);
  r.arrived |= me;
  f.state = kAtWarp;
  f.wait_what = what;
  f.wait_line = line;
  if (r.arrived == r.mask) {
    complete_collective(w, static_cast<int>(f.warp), id);
  }
  dispatch();
  return &r.x[0][0];
}

// Lanes that took part in the collective that just returned (CUDA: its mask; Metal: active).
inline unsigned coll_mask() { return cur().coll_mask; }

// Value of lane `src` from a collective's slot row, or 0xff poison when that lane did not
// take part (undefined on the GPU).
template <class T>
inline T lane_value(const unsigned char* row, int src, T self) {
  if (src < 0 || src >= kWarp) {
    return self;
  }
  T r;
  if (!(cur().coll_mask & (1u << src))) {
    memset(static_cast<void*>(&r), 0xff, sizeof(T));
    return r;
  }
  memcpy(static_cast<void*>(&r), row + src * kSlotBytes, sizeof(T));
  return r;
}

// A thread returned: drop it from barriers and collectives it can no longer join.
inline void async_land(Fiber& f, int keep_groups);

inline void on_exit(Fiber& f) {
  async_land(f, -1); // copies in flight still land
  f.state = kDone;
  --g_live;
  ++g_exited;
  release_held(f);
  WarpState& w = g_warps[f.warp];
  const unsigned me = 1u << f.lane;
  w.live &= ~me;
  for (int i = 0; i < w.ngather; ++i) {
    const int id = w.gather_ids[i];
    CollRec& r = w.rec[id];
    if (!(r.mask & me)) {
      continue;
    }
    if (g_cfg.dialect == kCuda) {
      fail("lane %u returned while lanes 0x%08x wait for it at %s (line %d)", f.lane, r.arrived,
           r.what, r.line);
    }
    r.mask &= ~me;
    if (r.mask == 0) {
      drop_gathering(w, id);
      r.state = 0;
      w.free_ids[w.nfree++] = id;
    } else if (r.arrived == r.mask) {
      complete_collective(w, static_cast<int>(f.warp), id);
    }
    break; // masks of gathering records are disjoint
  }
  if (g_block_arrived > 0) {
    if (g_cfg.strict) {
      fail("thread returned while %d thread(s) wait at %s (line %d): every thread must reach "
           "every barrier", g_block_arrived, g_block_what, g_block_line);
    }
    if (g_block_arrived == g_live) {
      complete_block_barrier();
    }
  }
}

inline void fiber_main(Fiber* f) {
  g_body(g_body_ctx);
  on_exit(*f);
  dispatch(); // never returns here: the fiber is done
  fail("internal: finished fiber resumed");
}

// A scheduling point outside barriers (atomics): lets spin-waits on other threads progress.
inline void yield() {
  if (!g_cur) {
    return;
  }
  rq_push(static_cast<int>(g_cur->lin));
  dispatch();
}

// ---- asynchronous copies (cp.async) -----------------------------------------------------

// A thread's cp.async copies are held back until a wait retires their group (or the thread
// returns): the destination keeps its old bytes until then, as late as the hardware may
// deliver them. So a kernel that reads a copy's destination before the wait that covers it
// (wrong wait count, missing commit, reading another thread's copy without a barrier after
// that thread's wait) reads stale or poisoned bytes and fails its check. The source is read
// when the copy is issued.
struct AsyncCopy {
  void* dst;
  int n;   // bytes (<= 16)
  int grp; // the commit that closes its group: pending until a wait retires it
  alignas(16) unsigned char data[16];
};
constexpr int kAsyncMax = 512; // copies in flight per thread
inline AsyncCopy* g_async = nullptr;

// src nullptr: zero fill (cp.async with src-size 0).
inline void async_copy(void* dst, const void* src, int n) {
  if (!g_cur) {
    fail("cp.async outside a kernel thread");
  }
  Fiber& f = cur();
  if (!g_async) {
    g_async = static_cast<AsyncCopy*>(calloc(static_cast<size_t>(kMaxThreads) * kAsyncMax, sizeof(AsyncCopy)));
    if (!g_async) {
      fail("internal: no memory for cp.async records");
    }
  }
  if (n <= 0 || n > 16) {
    fail("cp.async of %d bytes", n);
  }
  if (f.acp_n == kAsyncMax) {
    fail("more than %d cp.async copies in flight in one thread (no wait retires them?)", kAsyncMax);
  }
  AsyncCopy& c = g_async[static_cast<size_t>(f.lin) * kAsyncMax + f.acp_n++];
  c.dst = dst;
  c.n = n;
  c.grp = f.acp_commits;
  if (src) {
    memcpy(c.data, src, static_cast<size_t>(n));
  } else {
    memset(c.data, 0, static_cast<size_t>(n));
  }
}

inline void async_commit() {
  if (g_cur) {
    ++cur().acp_commits;
  }
}

// Lands, in issue order, every copy of a committed group older than the keep_groups most
// recent ones (cp.async.wait_group keep_groups); keep_groups < 0: every copy.
inline void async_land(Fiber& f, int keep_groups) {
  if (!g_async || f.acp_n == 0) {
    return;
  }
  AsyncCopy* q = g_async + static_cast<size_t>(f.lin) * kAsyncMax;
  int kept = 0;
  for (int i = 0; i < f.acp_n; ++i) {
    if (keep_groups < 0 || q[i].grp < f.acp_commits - keep_groups) {
      memcpy(q[i].dst, q[i].data, static_cast<size_t>(q[i].n));
    } else {
      q[kept++] = q[i];
    }
  }
  f.acp_n = kept;
}

inline void async_wait(int keep_groups) {
  if (g_cur) {
    async_land(cur(), keep_groups);
  }
}

// ---- shared memory poisoning ---------------------------------------------------------

// Called where a __shared__ / threadgroup variable is declared: the first thread of each
// block to get there fills it with 0xff bytes (NaN for floats), so reading shared memory
// that this block never wrote gives NaN/garbage instead of the previous block's values.
struct TouchRec {
  const void* p;
  uint64_t gen;
};
inline TouchRec g_touched[256];
inline int g_ntouched = 0;
inline size_t g_block_shared_bytes = 0; // distinct shared variables this block declared

constexpr size_t kMetalThreadgroupLimit = 32768; // bytes of threadgroup memory, Apple GPUs

inline void count_shared(size_t n) {
  g_block_shared_bytes += n;
  if (g_cfg.dialect == kMetal && g_block_shared_bytes > kMetalThreadgroupLimit) {
    fail("threadgroup memory of %zu bytes exceeds the %zu bytes of Apple GPUs: the pipeline "
         "would fail to build", g_block_shared_bytes, kMetalThreadgroupLimit);
  }
}

inline void touch_shared(void* p, size_t n) {
  for (int i = 0; i < g_ntouched; ++i) {
    if (g_touched[i].p == p) {
      if (g_touched[i].gen != g_touch_gen) {
        g_touched[i].gen = g_touch_gen;
        memset(p, 0xff, n);
        count_shared(n);
      }
      return;
    }
  }
  if (g_ntouched < 256) {
    g_touched[g_ntouched++] = {p, g_touch_gen};
  }
  memset(p, 0xff, n);
  count_shared(n);
}

// ---- signals: faults and CPU limit ---------------------------------------------------

inline struct sigaction g_old_act[4];
inline const int g_sigs[4] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
inline struct sigaction g_old_vt;
inline stack_t g_old_ss;
inline char* g_altstack = nullptr;

inline void on_fault(int sig, siginfo_t* si, void*) {
  if (!g_in_launch) {
    for (int i = 0; i < 4; ++i) {
      if (g_sigs[i] == sig) {
        sigaction(sig, &g_old_act[i], nullptr);
      }
    }
    return; // re-executes the faulting instruction under the old handler
  }
  g_fault_sig = sig;
  g_fault_addr = si ? si->si_addr : nullptr;
  siglongjmp(g_jmp, 1);
}

inline void on_cpu_limit(int, siginfo_t*, void*) {
  if (!g_in_launch) {
    return;
  }
  g_fault_sig = SIGVTALRM;
  siglongjmp(g_jmp, 1);
}

inline void install_handlers(int64_t cpu_limit_s) {
  const size_t alt = 1 << 16;
  if (!g_altstack) {
    g_altstack = static_cast<char*>(malloc(alt));
  }
  stack_t ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = alt;
  sigaltstack(&ss, &g_old_ss);
  struct sigaction sa {};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 4; ++i) {
    sigaction(g_sigs[i], &sa, &g_old_act[i]);
  }
  struct sigaction vt {};
  vt.sa_sigaction = &on_cpu_limit;
  vt.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&vt.sa_mask);
  sigaction(SIGVTALRM, &vt, &g_old_vt);
  itimerval it{};
  it.it_value.tv_sec = cpu_limit_s;
  setitimer(ITIMER_VIRTUAL, &it, nullptr);
}

inline void remove_handlers() {
  itimerval it{};
  setitimer(ITIMER_VIRTUAL, &it, nullptr);
  sigaction(SIGVTALRM, &g_old_vt, nullptr);
  for (int i = 0; i < 4; ++i) {
    sigaction(g_sigs[i], &g_old_act[i], nullptr);
  }
  sigaltstack(&g_old_ss, nullptr);
}

inline void describe_fault(char* out, size_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(g_fault_addr);
  const char* sname = g_fault_sig == SIGSEGV  ? "SIGSEGV"
                      : g_fault_sig == SIGBUS ? "SIGBUS"
                      : g_fault_sig == SIGFPE ? "SIGFPE (integer division by zero?)"
                                              : "SIGILL";
  char where[400] = "";
  for (int i = 0; i < g_nbufs; ++i) {
    const Buffer& b = g_bufs[i];
    if (a >= b.map_lo && a < b.map_hi) {
      if (a >= b.hi) {
        snprintf(where, sizeof(where), ": %zu bytes past the end of '%s' (%zu bytes)",
                 static_cast<size_t>(a - b.hi), b.name, static_cast<size_t>(b.hi - b.lo));
      } else if (a < b.lo) {
        snprintf(where, sizeof(where), ": %zu bytes before the start of '%s'",
                 static_cast<size_t>(b.lo - a), b.name);
      } else {
        snprintf(where, sizeof(where), ": inside '%s' at byte %zu", b.name,
                 static_cast<size_t>(a - b.lo));
      }
    }
  }
  if (!where[0] && g_stacks && a >= reinterpret_cast<uintptr_t>(g_stacks) &&
      a < reinterpret_cast<uintptr_t>(g_stacks) + g_stacks_map) {
    snprintf(where, sizeof(where), ": a thread's stack overflowed (raise stack_kb)");
  }
  snprintf(out, n, "%s at address %p%s", sname, g_fault_addr, where);
}

// ---- guarded buffers (exported to Python through the launcher) -----------------------

// `size` bytes whose end touches a PROT_NONE page (start 16-byte aligned, the few slack bytes
// before the guard are filled with 0xff), plus a guard page in front.
inline void* alloc_guarded(size_t size, size_t* map_size, void** map_base) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t padded = (size + 15) & ~size_t(15);
  const size_t body = ((padded + page - 1) / page) * page;
  const size_t total = body + 2 * page;
  char* base = static_cast<char*>(
      mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) {
    return nullptr;
  }
  mprotect(base, page, PROT_NONE);
  mprotect(base + page + body, page, PROT_NONE);
  char* p = base + page + body - padded;
  memset(base + page, 0xff, body);
  *map_size = total;
  *map_base = base;
  return p;
}

inline void release_stacks() {
  if (g_stacks) {
    munmap(g_stacks, g_stacks_map);
  }
  g_stacks = nullptr;
  g_stacks_map = g_stack_bytes = 0;
}

inline void ensure_stacks(int n, size_t kb) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t each = ((kb * 1024 + page - 1) / page) * page + page; // + guard page below
  const size_t need = each * static_cast<size_t>(n);
  if (g_stacks && g_stack_bytes == each && g_stacks_map >= need) {
    return;
  }
  if (g_stacks) {
    munmap(g_stacks, g_stacks_map);
  }
  g_stacks = static_cast<char*>(mmap(nullptr, need, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (g_stacks == MAP_FAILED) {
    g_stacks = nullptr;
    return;
  }
  for (int i = 0; i < n; ++i) {
    mprotect(g_stacks + each * i, page, PROT_NONE);
  }
  g_stack_bytes = each;
  g_stacks_map = need;
}

// ---- running one block and a whole launch --------------------------------------------

inline void run_block(U3 bid, U3 bdim) {
  g_bid = bid;
  g_bdim = bdim;
  g_nthreads = static_cast<int>(bdim.x * bdim.y * bdim.z);
  g_live = g_nthreads;
  g_exited = 0;
  g_block_arrived = 0;
  g_block_gen = 0;
  memset(g_block_x, 0xff, sizeof(g_block_x));
  g_touch_gen++;
  g_block_shared_bytes = 0;
  g_rq_head = g_rq_tail = 0;
  const int nwarps = (g_nthreads + kWarp - 1) / kWarp;
  for (int w = 0; w < nwarps; ++w) {
    WarpState& ws = g_warps[w];
    const int lanes = g_nthreads - w * kWarp < kWarp ? g_nthreads - w * kWarp : kWarp;
    ws.exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    ws.live = ws.exist;
    ws.ngather = 0;
    ws.nfree = kRecs;
    for (int r = 0; r < kRecs; ++r) {
      ws.free_ids[r] = kRecs - 1 - r;
      ws.rec[r].state = 0;
    }
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  int ids[kMaxThreads];
  for (int i = 0; i < g_nthreads; ++i) {
    Fiber& f = g_fibers[i];
    f.lin = static_cast<unsigned>(i);
    f.lane = static_cast<unsigned>(i % kWarp);
    f.warp = static_cast<unsigned>(i / kWarp);
    f.tid = {static_cast<unsigned>(i % bdim.x), static_cast<unsigned>((i / bdim.x) % bdim.y),
             static_cast<unsigned>(i / (bdim.x * bdim.y))};
    f.state = kRunnable;
    f.held = -1;
    f.coll_mask = 0;
    f.acp_n = 0;
    f.acp_commits = 0;
    f.wait_what = nullptr;
    f.wait_line = 0;
    init_fiber_stack(f, g_stacks + g_stack_bytes * i + page, g_stack_bytes - page);
    ids[i] = i;
  }
  wake(ids, g_nthreads);
  int first = rq_pop();
  switch_fiber(nullptr, &g_fibers[first]);
  // back on the main stack: every thread finished, or fail() gave up
}

template <class F>
void call_body(void* p) {
  (*static_cast<F*>(p))();
}

// Runs the whole grid. Returns 0 on success; otherwise writes a message to err.
inline int launch(const LaunchCfg& cfg, void (*body)(void*), void* ctx, char* err, int errlen) {
  g_cfg = cfg;
  g_body = body;
  g_body_ctx = ctx;
  g_failed = false;
  g_err[0] = 0;
  g_rng = 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(cfg.seed) * 0x2545F4914F6CDD1Dull;
  if (g_rng == 0) {
    g_rng = 1;
  }
  int64_t tg[3], nb[3], bd[3];
  for (int d = 0; d < 3; ++d) {
    if (cfg.grid[d] <= 0 || cfg.tg[d] <= 0) {
      snprintf(err, errlen, "grid and threadgroup sizes must be positive");
      return 1;
    }
    // MLX: threadgroup clamped to the grid; CUDA launches whole blocks past the grid edge,
    // Metal (dispatch_threads) makes the edge threadgroups smaller.
    tg[d] = cfg.tg[d] < cfg.grid[d] ? cfg.tg[d] : cfg.grid[d];
    nb[d] = (cfg.grid[d] + tg[d] - 1) / tg[d];
    bd[d] = tg[d];
  }
  if (tg[0] * tg[1] * tg[2] > kMaxThreads) {
    snprintf(err, errlen, "threadgroup of %lld threads exceeds %d",
             static_cast<long long>(tg[0] * tg[1] * tg[2]), kMaxThreads);
    return 1;
  }
  g_nblocks = {static_cast<unsigned>(nb[0]), static_cast<unsigned>(nb[1]),
               static_cast<unsigned>(nb[2])};
  g_dispatch_tg = {static_cast<unsigned>(tg[0]), static_cast<unsigned>(tg[1]),
                   static_cast<unsigned>(tg[2])};
  ensure_stacks(static_cast<int>(tg[0] * tg[1] * tg[2]),
                static_cast<size_t>(cfg.stack_kb > 0 ? cfg.stack_kb : 256));
  if (!g_stacks) {
    snprintf(err, errlen, "could not map fiber stacks");
    return 1;
  }
  const int64_t total = nb[0] * nb[1] * nb[2];
  int64_t* order = static_cast<int64_t*>(malloc(sizeof(int64_t) * (total > 0 ? total : 1)));
  for (int64_t i = 0; i < total; ++i) {
    order[i] = cfg.schedule == kReverse ? total - 1 - i : i;
  }
  if (cfg.schedule == kRandom) {
    for (int64_t i = total - 1; i > 0; --i) {
      int64_t j = static_cast<int64_t>(rng_next() % static_cast<uint64_t>(i + 1));
      int64_t t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
  }
  install_handlers(cfg.cpu_limit_s > 0 ? cfg.cpu_limit_s : 120);
  int rc = 0;
  volatile int64_t bi = 0;
  g_fault_sig = 0;
  const int jumped = sigsetjmp(g_jmp, 1);
  if (jumped == 0) {
    g_in_launch = 1;
    for (bi = 0; bi < total; ++bi) {
      const int64_t b = order[bi];
      U3 bid = {static_cast<unsigned>(b % nb[0]), static_cast<unsigned>((b / nb[0]) % nb[1]),
                static_cast<unsigned>(b / (nb[0] * nb[1]))};
      U3 bdim = {static_cast<unsigned>(bd[0]), static_cast<unsigned>(bd[1]),
                 static_cast<unsigned>(bd[2])};
      if (cfg.dialect == kMetal) {
        const int64_t ix[3] = {bid.x, bid.y, bid.z};
        int64_t e[3];
        for (int d = 0; d < 3; ++d) {
          const int64_t left = cfg.grid[d] - ix[d] * tg[d];
          e[d] = left < tg[d] ? left : tg[d];
        }
        bdim = {static_cast<unsigned>(e[0]), static_cast<unsigned>(e[1]),
                static_cast<unsigned>(e[2])};
      }
      run_block(bid, bdim);
      if (g_failed) {
        rc = 1;
        break;
      }
    }
  } else if (jumped == 1) {
    rc = 1;
    char who[160] = "";
    if (g_cur) {
      describe_thread(who, sizeof(who), *g_cur);
    }
    if (g_fault_sig == SIGVTALRM) {
      snprintf(g_err, sizeof(g_err),
               "emulation exceeded its CPU time limit (%llds): a spin loop waiting for another "
               "thread or block? %s",
               static_cast<long long>(cfg.cpu_limit_s), who);
    } else {
      char f[600];
      describe_fault(f, sizeof(f));
      snprintf(g_err, sizeof(g_err), "%s -- at %s", f, who);
    }
  } else {
    rc = 1;
  }
  g_in_launch = 0;
  g_cur = nullptr;
  remove_handlers();
  free(order);
  // Every loaded kernel library has its own stacks, two mappings each (stack, guard page): kept
  // between runs they add up to vm.max_map_count (65530) in a process that emulates ~100
  // kernels, and the next mmap fails. So they go with the run.
  release_stacks();
  if (rc) {
    snprintf(err, errlen, "%s", g_err[0] ? g_err : "emulation failed");
  }
  return rc;
}

} // namespace bbemu

// ---- exported helpers (one set per kernel library) ------------------------------------

extern "C" __attribute__((visibility("default"))) void* bbemu_alloc(uint64_t size,
                                                                     uint64_t* map_size,
                                                                     void** map_base) {
  size_t ms = 0;
  void* p = bbemu::alloc_guarded(size, &ms, map_base);
  *map_size = ms;
  return p;
}

extern "C" __attribute__((visibility("default"))) void bbemu_free(void* base, uint64_t size) {
  munmap(base, size);
}

extern "C" __attribute__((visibility("default"))) void bbemu_register(int i, const char* name,
                                                                       void* lo, uint64_t n,
                                                                       void* map_base,
                                                                       uint64_t map_size) {
  if (i < 0 || i >= 64) {
    return;
  }
  bbemu::Buffer& b = bbemu::g_bufs[i];
  b.name = name;
  b.lo = reinterpret_cast<uintptr_t>(lo);
  b.hi = b.lo + n;
  b.map_lo = reinterpret_cast<uintptr_t>(map_base);
  b.map_hi = b.map_lo + map_size;
  if (i + 1 > bbemu::g_nbufs) {
    bbemu::g_nbufs = i + 1;
  }
}
