// The virtual GPU's runtime: the fiber scheduler behind `run_grid`, the barriers, warp exchange,
// shared memory and the kernel table. See vgpu.h for the model.
#include "vgpu.h"

#include <ucontext.h>

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
// The opt-in maximum of dynamic shared memory per block on sm_90.
constexpr unsigned kMaxSmem = 227 * 1024;

// The threads that must arrive before a barrier releases: the block, or one warp.
struct Group {
    int live = 0;     // threads that have not returned
    int arrived = 0;  // threads waiting at the current barrier
    unsigned gen = 0; // bumped on each release
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
    ucontext_t scheduler;
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

void wait_group(Group& g) {
    unsigned gen = g.gen;
    st.progress++;
    if (++g.arrived == g.live) {
        g.arrived = 0;
        g.gen++;
        return;
    }
    while (g.gen == gen) yield();
}

void leave_group(Group& g) {
    g.live--;
    // The leaver may have been the last one a barrier was waiting for.
    if (g.arrived > 0 && g.arrived == g.live) {
        g.arrived = 0;
        g.gen++;
    }
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

std::map<std::string, Launcher>& registry() {
    static std::map<std::string, Launcher> table;
    return table;
}

}  // namespace

const uint3& thread_idx() { return current_fiber().tid; }

void* dynamic_smem() { return st.smem.data(); }

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

int run_grid(const LaunchCfg& cfg, BodyFn body, void* ctx, char* err, size_t err_len) {
    const dim3 g = cfg.grid, b = cfg.block;
    const unsigned long threads = (unsigned long)b.x * b.y * b.z;
    if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0 || threads > kMaxThreads) {
        return fail(err, err_len, 2, "invalid launch configuration (empty grid or > 1024 threads)");
    }
    if (cfg.smem > kMaxSmem) return fail(err, err_len, 2, "dynamic shared memory over 227 KiB");
    if (st.in_launch) return fail(err, err_len, 2, "nested launch");
    st.in_launch = true;
    st.body = body;
    st.ctx = ctx;
    grid_dim = g;
    block_dim = b;

    const int n = (int)threads;
    st.fibers.assign(n, Fiber{});
    while ((int)st.stacks.size() < n) st.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
    st.slots.assign(n, 0);
    st.smem.resize(cfg.smem);
    const int nwarps = (n + 31) / 32;

    for (unsigned bz = 0; bz < g.z; bz++)
        for (unsigned by = 0; by < g.y; by++)
            for (unsigned bx = 0; bx < g.x; bx++) {
                block_idx = uint3{bx, by, bz};
                // Poisoned (NaN bytes): a kernel that reads shared memory it did not write shows it.
                std::memset(st.smem.data(), 0xff, st.smem.size());
                st.block = Group{n, 0, 0};
                st.warps.assign(nwarps, Group{});
                for (int i = 0; i < n; i++) st.warps[i / 32].live++;
                for (int i = 0; i < n; i++) {
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
                int remaining = n;
                while (remaining > 0) {
                    unsigned long before = st.progress;
                    for (int i = 0; i < n; i++) {
                        if (st.fibers[i].done) continue;
                        st.current = i;
                        swapcontext(&st.scheduler, &st.fibers[i].ctx);
                        if (st.fibers[i].done) remaining--;
                    }
                    if (remaining > 0 && st.progress == before) {
                        st.in_launch = false;
                        st.current = -1;
                        char msg[160];
                        std::snprintf(msg, sizeof msg,
                                      "deadlock in block (%u, %u, %u): %d threads wait at barriers "
                                      "that the others never reach",
                                      bx, by, bz, remaining);
                        return fail(err, err_len, 3, msg);
                    }
                }
            }
    st.current = -1;
    st.in_launch = false;
    return 0;
}

Registrar::Registrar(const char* name, Launcher launcher) { registry()[name] = launcher; }

}  // namespace vgpu

// ---- the C interface that src/backend/gpu/vgpu.rs calls --------------------------------------

extern "C" int vgpu_launch(const char* name, const unsigned* grid, const unsigned* block, unsigned smem,
                           void** params, char* err, size_t err_len) {
    auto& table = vgpu::registry();
    auto it = table.find(name);
    if (it == table.end()) return vgpu::fail(err, err_len, 1, "no such kernel");
    vgpu::LaunchCfg cfg{dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]}, smem};
    return it->second(cfg, params, err, err_len);
}

extern "C" size_t vgpu_kernel_count() { return vgpu::registry().size(); }

// The i-th kernel name in sorted order; valid until the next registration (never, after start-up).
extern "C" const char* vgpu_kernel_name(size_t i) {
    auto& table = vgpu::registry();
    if (i >= table.size()) return nullptr;
    auto it = table.begin();
    std::advance(it, i);
    return it->first.c_str();
}
