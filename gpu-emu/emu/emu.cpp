// A CPU emulator of CUDA's execution model for weir's kernels (kernels/src/cuda/weir.cu), for the tests:
// it lets the kernels' own source run where there is no GPU, so their indexing, reductions and
// barriers are checked against the CPU kernels on every machine (kernels/src/cuda/tests.rs).
//
// Each thread of a block is a fiber (its own stack, switched by hand: no OS thread, no
// system call), all in the launching thread. A fiber runs until it must wait: at a
// `__syncthreads` (released when every thread of the block still running is there) or a
// `__shfl_xor_sync` (released when its warp's lanes are). Between barriers one warp runs as
// far as it can before the next starts, in an order drawn at random at every barrier: so a
// missing barrier shows up as a wrong result instead of hiding. Blocks run one after another,
// so `__shared__` arrays can be plain statics. Threads that diverge at a barrier or an
// exchange are reported, and the emulator aborts.
//
// What this does not check: timing, memory coalescing, register or shared-memory limits, the
// PTX NVRTC makes, or anything of cuBLAS. Those need a GPU.

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mutex>
#include <utility>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

static uint3 threadIdx, blockIdx; // set for each fiber before it runs
static dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline int min(int a, int b) { return a < b ? a : b; }

// IEEE half conversions, rounding to nearest even as PTX's cvt.rn does.
static inline float f16_to_f32(unsigned short h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}
static inline unsigned short f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    memcpy(&h, &v, 2);
    return h;
}

namespace emu {

// Where a thread is.
enum State { RUNNING, AT_BARRIER, AT_SHUFFLE, DONE };

// One thread of a block.
struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    char* stack = nullptr;
    uint3 idx;
    State state = DONE;
    unsigned syncs = 0;  // barriers reached in this block
    unsigned shuffles = 0;
    int site = 0;        // the source line it waits at
    float give = 0.0f, got = 0.0f;
    int mask = 0;
};

static const size_t STACK = 64 * 1024;

static void* sched_sp;       // the launching thread's stack while a fiber runs
static Fiber* running;       // the fiber running now
static void (*entry_fn)();   // runs the kernel for the current block

} // namespace emu

// Saves the callee-saved registers and the stack pointer in *from, and resumes `to` (a stack
// pointer saved the same way, or a fresh stack laid out by `start`).
extern "C" void weir_emu_switch(void** from, void* to);
#if defined(__x86_64__)
asm(R"(
.text
.globl weir_emu_switch
.type weir_emu_switch, @function
weir_emu_switch:
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
.size weir_emu_switch, .-weir_emu_switch
)");
#else
#error "weir's CUDA emulator switches fibers with x86-64 code only"
#endif

namespace emu {

static void fail(const char* what) {
    fprintf(stderr, "weir's CUDA emulator: %s\n", what);
    abort();
}

static void yield() { weir_emu_switch(&running->sp, sched_sp); }

static void fiber_main() {
    entry_fn();
    running->state = DONE;
    yield();
    fail("a finished fiber was resumed");
}

// Lays out a fresh stack so that switching to it enters fiber_main (the stack pointer 16-byte
// aligned before the pushed registers, as a call would leave it).
static void start(Fiber& f) {
    uintptr_t top = ((uintptr_t)(f.stack + STACK)) & ~(uintptr_t)15;
    void** sp = (void**)top - 8;
    for (int i = 0; i < 6; i++) sp[i] = nullptr; // r15 r14 r13 r12 rbx rbp
    sp[6] = (void*)&fiber_main;                 // where `ret` goes
    sp[7] = nullptr;                            // fiber_main's return address: it never returns
    f.sp = sp;
    f.syncs = f.shuffles = 0;
    f.state = RUNNING;
}

// `line`: the barrier's line in the source (not the code address: a compiler may copy one
// barrier into several paths).
static void sync(int line) {
    running->syncs++;
    running->site = line;
    running->state = AT_BARRIER;
    yield();
}

// A warp-wide exchange: this lane gives `v` and gets the value lane ^ mask gave, once every
// lane of the warp still running has reached the same exchange (other warps run on).
static float shfl_xor(float v, int mask, int line) {
    running->give = v;
    running->mask = mask;
    running->shuffles++;
    running->site = line;
    running->state = AT_SHUFFLE;
    yield();
    return running->got;
}

static unsigned long long next(unsigned long long& seed) {
    seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
    return seed;
}

template <class T>
static void shuffle(std::vector<T>& v, unsigned long long& seed) {
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[next(seed) % i]);
}

// Completes warp w's exchange if all its running lanes are at it.
static bool exchange(std::vector<Fiber>& fibers, unsigned w) {
    unsigned n = (unsigned)fibers.size(), lo = w * 32, hi = lo + 32 < n ? lo + 32 : n, waiting = 0, live = 0;
    for (unsigned t = lo; t < hi; t++) {
        live += fibers[t].state != DONE;
        waiting += fibers[t].state == AT_SHUFFLE;
    }
    if (waiting == 0 || waiting != live) return false;
    for (unsigned t = lo; t < hi; t++) {
        Fiber& f = fibers[t];
        if (f.state == DONE) continue;
        unsigned p = t ^ (unsigned)f.mask;
        if (f.mask >= 32 || p >= hi || fibers[p].state != AT_SHUFFLE)
            fail("__shfl_xor_sync with a partner lane that is not in the exchange");
        if (fibers[p].shuffles != f.shuffles || fibers[p].site != f.site || fibers[p].mask != f.mask)
            fail("a warp's lanes reached different __shfl_xor_sync calls (diverged)");
        f.got = fibers[p].give;
    }
    for (unsigned t = lo; t < hi; t++)
        if (fibers[t].state == AT_SHUFFLE) fibers[t].state = RUNNING;
    return true;
}

// Runs one block to its end. Between two barriers the warps run one at a time in an order
// drawn afresh at each barrier, each as far as it can (its lanes in a shuffled order, up to
// each exchange): the most uneven schedule a GPU could produce, so a read of shared memory
// that is not ordered by a barrier sees the wrong value. A block where no thread can go on
// has diverged.
static void run_block(std::vector<Fiber>& fibers, unsigned long long& seed) {
    unsigned n = (unsigned)fibers.size(), warps = (n + 31) / 32;
    std::vector<unsigned> lanes, order(warps);
    for (unsigned w = 0; w < warps; w++) order[w] = w;
    shuffle(order, seed);
    for (auto& f : fibers) start(f);
    for (;;) {
        bool ran = false;
        for (unsigned w : order) {
            lanes.clear();
            for (unsigned t = w * 32; t < n && t < w * 32 + 32; t++)
                if (fibers[t].state == RUNNING) lanes.push_back(t);
            if (lanes.empty()) continue;
            shuffle(lanes, seed);
            for (unsigned t : lanes) {
                running = &fibers[t];
                threadIdx = fibers[t].idx;
                weir_emu_switch(&sched_sp, fibers[t].sp);
            }
            exchange(fibers, w);
            ran = true;
            break;
        }
        if (ran) continue;
        // No thread can run: the block is done, at a barrier, or stuck.
        unsigned live = 0, waiting = 0;
        const Fiber* first = nullptr;
        for (auto& f : fibers) {
            if (f.state == DONE) continue;
            live++;
            waiting += f.state == AT_BARRIER;
            if (!first) first = &f;
            else if (f.state == AT_BARRIER && (f.syncs != first->syncs || f.site != first->site))
                fail("threads reached different __syncthreads calls (diverged)");
        }
        if (live == 0) return;
        if (waiting != live) fail("no thread can go on: a barrier or an exchange that not every thread reaches");
        for (auto& f : fibers) if (f.state == AT_BARRIER) f.state = RUNNING;
        shuffle(order, seed);
    }
}

} // namespace emu

#define __syncthreads() emu::sync(__LINE__)
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor((v), (o), __LINE__)
#define WEIR_EMU 1

#include "../../kernels/src/cuda/weir.cu"

namespace emu {

template <class... A, size_t... I>
static void invoke(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<A*>(args[I])...);
}

// Runs `f` on a grid of blocks; `args` as cuLaunchKernel takes them (a pointer to each).
template <class... A>
static void launch(void (*f)(A...), dim3 grid, dim3 block, void** args) {
    static void (*kernel)(A...);
    static void** kernel_args;
    kernel = f;
    kernel_args = args;
    entry_fn = [] { invoke(kernel, kernel_args, std::index_sequence_for<A...>{}); };
    unsigned threads = block.x * block.y * block.z;
    blockDim = block;
    gridDim = grid;
    std::vector<Fiber> fibers(threads);
    // The stacks are kept from launch to launch (a launch runs under one_launch_at_a_time).
    static std::vector<char> stacks;
    if (stacks.size() < (size_t)threads * STACK) stacks.resize((size_t)threads * STACK);
    for (unsigned t = 0; t < threads; t++) {
        fibers[t].stack = stacks.data() + (size_t)t * STACK;
        fibers[t].idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    }
    unsigned long long seed = 0x9e3779b97f4a7c15ull;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = {x, y, z};
                run_block(fibers, seed);
            }
}

static std::mutex one_launch_at_a_time; // the statics standing in for shared memory

// The size of each of `f`'s parameters, as cuLaunchKernel's caller lays them out.
template <class... A>
static int arg_sizes(void (*)(A...), unsigned* sizes, int max) {
    const unsigned s[] = {(unsigned)sizeof(A)..., 0};
    int n = (int)sizeof...(A);
    for (int i = 0; i < n && i < max; i++) sizes[i] = s[i];
    return n;
}

} // namespace emu

#define WEIR_EMU_KERNELS(X) \
    X(embed) X(rmsnorm) X(rope) X(silu_mul) X(add) X(add_bias) X(narrow) X(gather_rows) X(scatter_rows) \
    X(sigmoid_gate) X(kv_store) X(attend) X(argmax) X(top_k)

// How many parameters kernel `name` takes (their sizes in `sizes`, up to `max`); -1 for an
// unknown name.
extern "C" int weir_emu_arg_sizes(const char* name, unsigned* sizes, int max) {
#define WEIR_SIZES(k) \
    if (strcmp(name, #k) == 0) return emu::arg_sizes(k, sizes, max);
    WEIR_EMU_KERNELS(WEIR_SIZES)
    return -1;
}

// Launches kernel `name`; 0 on success, -1 for an unknown name.
extern "C" int weir_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, void** args) {
    std::lock_guard<std::mutex> l(emu::one_launch_at_a_time);
    dim3 g = {gx, gy, gz}, b = {bx, by, bz};
#define WEIR_LAUNCH(k)                 \
    if (strcmp(name, #k) == 0) {       \
        emu::launch(k, g, b, args);    \
        return 0;                      \
    }
    WEIR_EMU_KERNELS(WEIR_LAUNCH)
    return -1;
}
