// The virtual GPU's runtime: the fiber scheduler behind `run_grid`, the barriers, warp exchange,
// shared memory, the launch checks and the kernel table. See vgpu.h for the model.
#include "vgpu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace vgpu {

thread_local uint3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;

namespace {

// Kernels keep little on their stacks; 128 KiB is generous and only touched pages cost memory.
constexpr size_t kStackBytes = 128 * 1024;
constexpr unsigned kMaxThreads = 1024;
// Shared memory per block, static + dynamic (with the opt-in attribute CudaDevice sets), on the
// smallest GPU we ship kernels for: sm_86 and sm_89 allow 99 KiB (sm_80 163, sm_90 227).
constexpr unsigned long kMaxSmem = 99 * 1024;
// Static shared memory per block without the opt-in: 48 KiB on every GPU.
constexpr unsigned long kMaxStaticSmem = 48 * 1024;

// A SHARED array of the kernels: where this OS thread's copy is, and the block and launch that
// last used it.
struct SharedVar {
    void* p;
    size_t bytes;
    unsigned long block_serial;
    unsigned long launch_serial;
};

// splitmix64: the shuffled schedule's random numbers.
struct Rng {
    unsigned long long x;
    unsigned long long next() {
        unsigned long long z = (x += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    // Uniform in [0, n), n > 0 (the modulo bias is irrelevant here).
    unsigned long below(unsigned long n) { return (unsigned long)(next() % n); }
};

// The threads that must arrive before a barrier releases: the block, or one warp.
struct Group {
    int live = 0;              // threads that have not returned
    int arrived = 0;           // threads waiting at the current barrier
    unsigned gen = 0;          // bumped on each release
    std::vector<int> waiters;  // the threads waiting at the current barrier
};

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    int linear = 0;
    bool done = false;
};

struct State {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;  // reused across launches
    std::vector<Group> warps;
    Group block;
    std::vector<uint64_t> slots;  // (threads) one exchange slot per thread
    std::vector<unsigned char> smem;
    std::vector<SharedVar> shared_vars;  // every SHARED array this OS thread has met
    unsigned long block_serial = 0;      // bumped at each block's start
    unsigned long launch_serial = 0;     // bumped at each launch
    unsigned long static_bytes = 0;      // SHARED bytes the current launch has used
    unsigned dynamic_bytes = 0;          // the current launch's dynamic shared memory
    char limit_error[200] = {0};         // set when the launch went past a shared-memory limit
    ucontext_t scheduler;
    bool shuffled = false;   // the launch picks a random ready thread at each step
    std::vector<int> ready;  // under the shuffled schedule: the threads that can run now
    int current = -1;
    unsigned long progress = 0;  // barrier arrivals, releases and exits
    BodyFn body = nullptr;
    void* ctx = nullptr;
    bool in_launch = false;

    ~State() {
        for (char* s : stacks) std::free(s);
    }
};

thread_local State st;

Fiber& current_fiber() { return st.fibers[st.current]; }

void yield() { swapcontext(&current_fiber().ctx, &st.scheduler); }

// Lets the threads waiting at `g`'s barrier go on; under the shuffled schedule they become ready
// to be picked.
void release(Group& g) {
    g.arrived = 0;
    g.gen++;
    if (st.shuffled) st.ready.insert(st.ready.end(), g.waiters.begin(), g.waiters.end());
    g.waiters.clear();
}

void wait_group(Group& g) {
    unsigned gen = g.gen;
    st.progress++;
    if (++g.arrived == g.live) {
        release(g);
        return;
    }
    g.waiters.push_back(st.current);
    while (g.gen == gen) yield();
}

void leave_group(Group& g) {
    g.live--;
    // The leaver may have been the last one a barrier was waiting for.
    if (g.arrived > 0 && g.arrived == g.live) release(g);
}

void fiber_entry() {
    st.body(st.ctx);
    Fiber& f = current_fiber();
    f.done = true;
    st.progress++;
    leave_group(st.block);
    leave_group(st.warps[f.linear / 32]);
    // Returning switches to uc_link, the scheduler.
}

int fail(char* err, size_t err_len, int code, const char* msg) {
    if (err && err_len) std::snprintf(err, err_len, "%s", msg);
    return code;
}

// A registered kernel.
struct Entry {
    Launcher launcher;
    std::string file;       // the .cu file, without its folder
    unsigned block;         // __launch_bounds__: the block size every launch must use
    std::string signature;  // parameter kinds, "ppif"
};

std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> table;
    return table;
}

}  // namespace

const uint3& thread_idx() { return current_fiber().tid; }

void* dynamic_smem() { return st.smem.data(); }

void static_smem(void* p, size_t bytes) {
    SharedVar* v = nullptr;
    for (SharedVar& s : st.shared_vars) {
        if (s.p == p) {
            v = &s;
            break;
        }
    }
    if (!v) {
        st.shared_vars.push_back(SharedVar{p, bytes, 0, 0});
        v = &st.shared_vars.back();
    }
    if (v->launch_serial != st.launch_serial) {
        v->launch_serial = st.launch_serial;
        st.static_bytes += bytes;
        if (!st.limit_error[0] && st.static_bytes > kMaxStaticSmem) {
            std::snprintf(st.limit_error, sizeof st.limit_error,
                          "static shared memory %lu bytes > %lu (48 KiB, the static limit)", st.static_bytes,
                          kMaxStaticSmem);
        } else if (!st.limit_error[0] && st.static_bytes + st.dynamic_bytes > kMaxSmem) {
            std::snprintf(st.limit_error, sizeof st.limit_error,
                          "shared memory %lu static + %u dynamic bytes > %lu (99 KiB, sm_86/sm_89's limit)",
                          st.static_bytes, st.dynamic_bytes, kMaxSmem);
        }
    }
    if (v->block_serial != st.block_serial) {
        v->block_serial = st.block_serial;
        // NaN bytes: a read of shared memory no thread of this block wrote shows in the output.
        std::memset(p, 0xff, bytes);
    }
}

void syncthreads() { wait_group(st.block); }

void syncwarp() { wait_group(st.warps[current_fiber().linear / 32]); }

int lane_id() { return current_fiber().linear % 32; }

uint64_t warp_exchange(uint64_t value, int src_lane) {
    Fiber& f = current_fiber();
    int me = f.linear;
    int src = me - me % 32 + src_lane;
    st.slots[me] = value;
    syncwarp();
    uint64_t got = (src >= 0 && src < (int)st.fibers.size()) ? st.slots[src] : value;
    // Nobody overwrites a slot before every lane has read.
    syncwarp();
    return got;
}

unsigned warp_ballot(bool pred) {
    Fiber& f = current_fiber();
    int me = f.linear;
    int base = me - me % 32;
    st.slots[me] = pred ? 1 : 0;
    syncwarp();
    unsigned bits = 0;
    for (int lane = 0; lane < 32 && base + lane < (int)st.fibers.size(); lane++) {
        const Fiber& other = st.fibers[base + lane];
        if (!other.done && st.slots[base + lane]) bits |= 1u << lane;
    }
    syncwarp();
    return bits;
}

namespace {

// The order in which a grid's `count` blocks (or a block's threads) run: index order, reversed, or
// a permutation drawn from `rng`.
void schedule_order(std::vector<unsigned>& order, unsigned long count, int schedule, Rng& rng) {
    order.resize(count);
    for (unsigned long i = 0; i < count; i++) order[i] = (unsigned)i;
    if (schedule == 1) {
        std::reverse(order.begin(), order.end());
    } else if (schedule == 2) {
        for (unsigned long i = count; i > 1; i--) std::swap(order[i - 1], order[rng.below(i)]);
    }
}

// Block `i` of a grid of `count` blocks in a schedule's order. Large grids (whose order would not
// fit a small table) are shuffled by an affine permutation `a·i + c mod count`, gcd(a, count) = 1.
struct BlockOrder {
    std::vector<unsigned> table;
    unsigned long count = 0, a = 1, c = 0;
    int schedule = 0;
    static constexpr unsigned long kTable = 1ul << 20;

    void init(unsigned long n, int sched, Rng& rng) {
        count = n;
        schedule = sched;
        table.clear();
        if (sched == 2 && n <= kTable) {
            schedule_order(table, n, sched, rng);
        } else if (sched == 2) {
            auto gcd = [](unsigned long x, unsigned long y) {
                while (y) {
                    unsigned long t = x % y;
                    x = y;
                    y = t;
                }
                return x;
            };
            do a = 1 + rng.below(n - 1);
            while (gcd(a, n) != 1);
            c = rng.below(n);
        }
    }
    unsigned long at(unsigned long i) const {
        if (schedule == 1) return count - 1 - i;
        if (schedule == 2) return table.empty() ? (unsigned long)((a * (unsigned __int128)i + c) % count) : table[i];
        return i;
    }
};

// Thread `i` of a block of shape `b`, ready to run the kernel body from its start. Out of line:
// getcontext counts as a setjmp, which would make the compiler distrust the caller's locals.
__attribute__((noinline)) void start_fiber(int i, dim3 b) {
    Fiber& f = st.fibers[i];
    f.linear = i;
    f.tid = uint3{(unsigned)(i % b.x), (unsigned)((i / b.x) % b.y), (unsigned)(i / (b.x * b.y))};
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = st.stacks[i];
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &st.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
}

// Runs the started threads of a block in sweeps: each sweep resumes every waiting thread once, in
// index order (schedule 0) or reversed (1), and each runs to its next barrier. Returns the number
// of threads left waiting when a sweep made no progress (a deadlock), else 0.
int run_block_sweeps(int n, int schedule, std::vector<unsigned>& order) {
    Rng unused{0};
    schedule_order(order, n, schedule, unused);
    int remaining = n;
    while (remaining > 0) {
        const unsigned long before = st.progress;
        for (int j = 0; j < n; j++) {
            const int i = (int)order[j];
            if (st.fibers[i].done) continue;
            st.current = i;
            swapcontext(&st.scheduler, &st.fibers[i].ctx);
            if (st.fibers[i].done) remaining--;
        }
        if (remaining > 0 && st.progress == before) return remaining;
    }
    return 0;
}

// Runs the started threads of a block by picking a random ready thread at each step (ready: not
// waiting at a barrier that has not released). A warp can run ahead through several barriers of
// its own while another warp has not started, which sweeps never do. Returns the number of threads
// left waiting when none is ready (a deadlock), else 0.
int run_block_shuffled(int n, Rng& rng) {
    st.shuffled = true;
    st.ready.clear();
    for (int i = 0; i < n; i++) st.ready.push_back(i);
    int remaining = n;
    while (!st.ready.empty()) {
        const unsigned long k = rng.below(st.ready.size());
        const int i = st.ready[k];
        st.ready[k] = st.ready.back();
        st.ready.pop_back();
        st.current = i;
        swapcontext(&st.scheduler, &st.fibers[i].ctx);
        if (st.fibers[i].done) remaining--;
    }
    st.shuffled = false;
    return remaining;
}

}  // namespace

int run_grid(const LaunchCfg& cfg, BodyFn body, void* ctx, char* err, size_t err_len) {
    const dim3 g = cfg.grid, b = cfg.block;
    const unsigned long threads = (unsigned long)b.x * b.y * b.z;
    if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0 || threads > kMaxThreads) {
        return fail(err, err_len, 2, "invalid launch configuration (empty grid or > 1024 threads)");
    }
    if (cfg.smem > kMaxSmem) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "dynamic shared memory %u bytes > %lu (99 KiB, sm_86/sm_89's limit)", cfg.smem,
                      kMaxSmem);
        return fail(err, err_len, 2, msg);
    }
    if (cfg.schedule < 0 || cfg.schedule > 2) return fail(err, err_len, 2, "unknown schedule");
    if (st.in_launch) return fail(err, err_len, 2, "nested launch");
    st.in_launch = true;
    st.body = body;
    st.ctx = ctx;
    st.launch_serial++;
    st.static_bytes = 0;
    st.dynamic_bytes = cfg.smem;
    st.limit_error[0] = 0;
    grid_dim = g;
    block_dim = b;
    Rng rng{cfg.seed};

    const int n = (int)threads;
    st.fibers.assign(n, Fiber{});
    while ((int)st.stacks.size() < n) st.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
    st.slots.assign(n, 0);
    st.smem.resize(cfg.smem);
    const int nwarps = (n + 31) / 32;
    const unsigned long blocks = (unsigned long)g.x * g.y * g.z;
    BlockOrder block_order;
    block_order.init(blocks, cfg.schedule, rng);
    std::vector<unsigned> thread_order;  // of the sweeps

    for (unsigned long k = 0; k < blocks; k++) {
        const unsigned long linear = block_order.at(k);
        const unsigned bx = (unsigned)(linear % g.x), by = (unsigned)((linear / g.x) % g.y),
                       bz = (unsigned)(linear / ((unsigned long)g.x * g.y));
        block_idx = uint3{bx, by, bz};
        st.block_serial++;
        // Poisoned (NaN bytes): a kernel that reads shared memory it did not write shows it.
        std::memset(st.smem.data(), 0xff, st.smem.size());
        st.block = Group{};
        st.block.live = n;
        st.warps.assign(nwarps, Group{});
        for (int i = 0; i < n; i++) st.warps[i / 32].live++;
        for (int i = 0; i < n; i++) start_fiber(i, b);
        const int stuck = cfg.schedule == 2 ? run_block_shuffled(n, rng) : run_block_sweeps(n, cfg.schedule, thread_order);
        if (stuck > 0) {
            st.in_launch = false;
            st.current = -1;
            char msg[160];
            std::snprintf(msg, sizeof msg,
                          "deadlock in block (%u, %u, %u): %d threads wait at barriers that the others never reach",
                          bx, by, bz, stuck);
            return fail(err, err_len, 3, msg);
        }
        if (st.limit_error[0]) break;
    }
    st.current = -1;
    st.in_launch = false;
    if (st.limit_error[0]) return fail(err, err_len, 2, st.limit_error);
    return 0;
}

Registrar::Registrar(const char* name, const char* file, unsigned block, const char* signature, Launcher launcher) {
    std::string f = file;
    const size_t slash = f.find_last_of('/');
    if (slash != std::string::npos) f = f.substr(slash + 1);
    registry()[name] = Entry{launcher, f, block, signature};
}

}  // namespace vgpu

// ---- the C interface that src/backend/gpu/vgpu.rs calls --------------------------------------

extern "C" int vgpu_launch(const char* name, const unsigned* grid, const unsigned* block, unsigned smem,
                           int schedule, unsigned long long seed, const char* kinds, void** params, char* err,
                           size_t err_len) {
    auto& table = vgpu::registry();
    auto it = table.find(name);
    if (it == table.end()) return vgpu::fail(err, err_len, 1, "no such kernel");
    const vgpu::Entry& e = it->second;
    // The host's arguments against the kernel's parameters: a launch that passes them in the wrong
    // order, or a 32-bit value where the kernel reads a pointer, fails here instead of corrupting
    // memory.
    if (e.signature != kinds) {
        char msg[256];
        std::snprintf(msg, sizeof msg,
                      "arguments (%s) do not match the kernel's parameters (%s) (p pointer, i int, f float)", kinds,
                      e.signature.c_str());
        return vgpu::fail(err, err_len, 4, msg);
    }
    const unsigned long threads = (unsigned long)block[0] * block[1] * block[2];
    if (threads <= 1024 && threads != e.block) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "launched with %lu threads per block; its __launch_bounds__ is %u", threads,
                      e.block);
        return vgpu::fail(err, err_len, 4, msg);
    }
    vgpu::LaunchCfg cfg{dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]}, smem, schedule,
                        (unsigned long)seed};
    return e.launcher(cfg, params, err, err_len);
}

extern "C" size_t vgpu_kernel_count() { return vgpu::registry().size(); }

// The i-th kernel in sorted order, its file, block size and parameter kinds; false past the end.
// The strings stay valid: the table never changes after start-up.
extern "C" bool vgpu_kernel_info(size_t i, const char** name, const char** file, unsigned* block,
                                 const char** signature) {
    auto& table = vgpu::registry();
    if (i >= table.size()) return false;
    auto it = table.begin();
    std::advance(it, i);
    *name = it->first.c_str();
    *file = it->second.file.c_str();
    *block = it->second.block;
    *signature = it->second.signature.c_str();
    return true;
}
