// An emulated CUDA device for the tests: the parts of the CUDA driver API, cuBLAS and NVRTC
// that weir calls (through cudarc), implemented on the CPU, with weir's kernels run by the
// emulator of emu.cpp. Built as one library and loaded under the names cudarc looks for
// (libcuda.so, libcublas.so, libnvrtc.so: the `weir-gpu-emu` crate), it lets every GPU
// test and GPU graph run on a machine without a GPU: the Rust around the kernels — contexts,
// streams, events, pools, uploads, operators, whole engines — is exercised as on a GPU.
//
// What it checks that running synchronously would not: work is queued per stream and runs only
// when the host waits for something (a stream, an event, a copy to pageable memory), the
// streams taking turns at random, one operation at a time. A stream that reads a buffer another
// stream writes, without waiting for that stream's event, can therefore read it before it is
// written. Freed device memory is filled with 0xff bytes (NaN as f32) before it is given back,
// and new device memory starts that way, so reading memory nobody wrote shows in the results;
// each buffer ends against an inaccessible page, so a kernel that runs past its end crashes.
// Copies are checked against the device allocations they touch. Pinned host memory is read
// and written when the copy runs, as a DMA engine would; pageable memory when the call is made,
// as the driver's staging does.
//
// What it does not: timing, concurrency within the device, the PTX itself (the "PTX" the
// emulated NVRTC hands out only names the kernels), and anything of cuBLAS beyond GemmEx in
// f32, f16 and bf16 with f32 accumulation.

#include "emu.cpp"

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <sys/mman.h>

typedef int CUresult;
enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};
typedef unsigned long long CUdeviceptr;

namespace drv {

static std::mutex lock; // every call of the API holds it; queued work runs under it

static const char* NAME = "weir emulated GPU (CPU)";
static const int CAPABILITY_MAJOR = 99, CAPABILITY_MINOR = 0; // no real device's: its PTX cache is its own

static size_t env_size(const char* name, size_t fallback) {
    const char* v = getenv(name);
    return v && *v ? (size_t)strtoull(v, nullptr, 10) : fallback;
}
static int devices() { return (int)env_size("WEIR_EMU_DEVICES", 1); }
static size_t total_bytes() { return env_size("WEIR_EMU_GPU_BYTES", (size_t)16 << 30); }

static unsigned long long seed = 0;
static unsigned long long draw() {
    if (seed == 0) seed = env_size("WEIR_EMU_SEED", 0x2545f4914f6cdd1dull) | 1;
    seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
    return seed;
}

static double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static void fail(const std::string& what) {
    fprintf(stderr, "weir's emulated CUDA device: %s\n", what.c_str());
    abort();
}

// --- memory ------------------------------------------------------------------------------

// Live device allocations and pinned host ranges, by start address.
static std::map<uintptr_t, size_t> device_mem, pinned_mem;
static size_t device_in_use = 0;
// Freed device memory, poisoned and kept a while so that a late reader sees the poison.
static std::deque<std::pair<void*, size_t>> quarantine;
static size_t quarantined = 0;

static bool inside(const std::map<uintptr_t, size_t>& m, uintptr_t p, size_t n) {
    auto it = m.upper_bound(p);
    if (it == m.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}

static const size_t PAGE = 4096;

// Device memory is mapped on its own, its end flush against a page that may not be touched:
// a kernel reading or writing past the end of a buffer stops the process there (SIGSEGV)
// instead of reading its neighbour. Starts are 16-byte aligned (the end is the page's start,
// less the size rounded to 16).
static size_t span_of(size_t rounded) { return (rounded + PAGE - 1) / PAGE * PAGE + PAGE; }

static CUresult device_alloc(CUdeviceptr* out, size_t bytes) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    size_t rounded = bytes == 0 ? 16 : (bytes + 15) / 16 * 16;
    if (device_in_use + rounded > total_bytes()) return CUDA_ERROR_OUT_OF_MEMORY;
    size_t span = span_of(rounded);
    void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* guard = (char*)m + span - PAGE;
    mprotect(guard, PAGE, PROT_NONE);
    char* p = guard - rounded;
    memset(p, 0xff, rounded);
    device_mem[(uintptr_t)p] = rounded;
    device_in_use += rounded;
    *out = (CUdeviceptr)p;
    return CUDA_SUCCESS;
}

static void unmap(void* p, size_t rounded) {
    size_t span = span_of(rounded);
    munmap((char*)p + rounded + PAGE - span, span);
}

static CUresult device_free(CUdeviceptr d) {
    auto it = device_mem.find((uintptr_t)d);
    if (it == device_mem.end()) return CUDA_ERROR_INVALID_VALUE;
    memset((void*)d, 0xff, it->second);
    quarantine.push_back({(void*)d, it->second});
    quarantined += it->second;
    device_in_use -= it->second;
    device_mem.erase(it);
    while (quarantined > ((size_t)64 << 20)) {
        unmap(quarantine.front().first, quarantine.front().second);
        quarantined -= quarantine.front().second;
        quarantine.pop_front();
    }
    return CUDA_SUCCESS;
}

// --- streams and events ------------------------------------------------------------------

struct Event {
    unsigned flags = 0;
    unsigned long long recorded = 0, completed = 0; // records made, records done
    double at_ms = 0;
    unsigned uses = 1;                               // the handle, and each queued op naming it
    bool destroyed = false;
};

static void release(Event* e) {
    if (--e->uses == 0) delete e;
}

struct Op {
    std::function<void()> run;
    Event* wait = nullptr; // runs only once this event's record `wait_for` is done
    unsigned long long wait_for = 0;
};

struct Stream {
    std::deque<Op> ops;
};

static std::vector<Stream*> streams;
static Stream* default_stream() {
    static Stream* s = [] {
        Stream* s = new Stream;
        streams.push_back(s);
        return s;
    }();
    return s;
}
static Stream* stream_of(void* s) { return s ? (Stream*)s : default_stream(); }

static bool ready(const Op& op) { return !op.wait || op.wait->completed >= op.wait_for; }

static void pop_and_run(Stream* s) {
    Op op = std::move(s->ops.front());
    s->ops.pop_front();
    if (op.run) op.run();
    if (op.wait) release(op.wait);
}

// Runs queued work, one op at a time from a stream drawn at random among those that can go on,
// until `done` holds.
static void run_until(const std::function<bool()>& done) {
    std::vector<Stream*> can;
    while (!done()) {
        can.clear();
        for (Stream* s : streams)
            if (!s->ops.empty() && ready(s->ops.front())) can.push_back(s);
        if (can.empty()) fail("the host waits for work that can never run (a stream waits for an event that is never done)");
        pop_and_run(can[draw() % can.size()]);
    }
}

static void run_all() {
    run_until([] {
        for (Stream* s : streams)
            if (!s->ops.empty()) return false;
        return true;
    });
}

static void finish(Stream* s) {
    run_until([s] { return s->ops.empty(); });
}

static void enqueue(void* stream, std::function<void()> run) { stream_of(stream)->ops.push_back(Op{std::move(run)}); }

// --- modules -----------------------------------------------------------------------------

struct Function {
    std::string name;
    std::vector<unsigned> sizes;
};
struct Module {
    std::vector<Function*> functions;
};

static const char* PTX_MARK = "// weir emulated PTX";

// Calls counted, for tests of how the host drives the device (`weir_emu_counts`).
enum Count {
    CTX_SYNCHRONIZE,   // cuCtxSynchronize: the whole device
    MEM_FREE_SYNC,     // cuMemFree: waits for the whole device as well
    STREAM_SYNCHRONIZE,
    EVENT_SYNCHRONIZE,
    LAUNCHES,
    H2D_PINNED, // copies to the device from pinned memory
    H2D_PAGEABLE,
    D2H,
    COUNTS
};
static unsigned long long counts[COUNTS];

} // namespace drv

using namespace drv;

#define API extern "C" __attribute__((visibility("default")))
#define LOCKED std::lock_guard<std::mutex> guard(drv::lock)

// --- the driver API ----------------------------------------------------------------------

API CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
API CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
API CUresult cuGetErrorString(CUresult r, const char** s) {
    static std::map<int, std::string> names;
    LOCKED;
    auto& n = names[r];
    if (n.empty()) n = "emulated CUDA error " + std::to_string(r);
    *s = n.c_str();
    return CUDA_SUCCESS;
}
API CUresult cuGetErrorName(CUresult r, const char** s) { return cuGetErrorString(r, s); }

API CUresult cuDeviceGetCount(int* n) {
    *n = devices();
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal < 0 || ordinal >= devices()) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetName(char* name, int len, int) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", NAME);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = total_bytes();
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
    case 1: *v = 1024; break;            // max threads per block
    case 8: *v = 48 * 1024; break;       // shared memory per block
    case 10: *v = 32; break;             // warp size
    case 16: *v = 1; break;              // multiprocessors
    case 19: case 41: *v = 1; break;     // maps host memory; unified addressing
    case 75: *v = CAPABILITY_MAJOR; break;
    case 76: *v = CAPABILITY_MINOR; break;
    case 115: *v = 1; break;             // memory pools (stream-ordered allocation), as on H100
    default: *v = 0;
    }
    return CUDA_SUCCESS;
}

static int the_context[16]; // a primary context per device: its address is the handle
static thread_local void* current = nullptr;

API CUresult cuDevicePrimaryCtxRetain(void** ctx, int d) {
    if (d < 0 || d >= devices() || d >= 16) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &the_context[d];
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }
API CUresult cuCtxSetCurrent(void* ctx) {
    current = ctx;
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = current;
    return CUDA_SUCCESS;
}
API CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
API CUresult cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) *ctx = current;
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetDevice(int* d) {
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    *d = (int)((int*)current - the_context);
    return CUDA_SUCCESS;
}
API CUresult cuCtxSynchronize() {
    LOCKED;
    counts[CTX_SYNCHRONIZE]++;
    run_all();
    return CUDA_SUCCESS;
}

API CUresult cuStreamCreate(void** s, unsigned) {
    LOCKED;
    Stream* st = new Stream;
    streams.push_back(st);
    *s = st;
    return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
API CUresult cuStreamDestroy_v2(void* s) {
    LOCKED;
    Stream* st = stream_of(s);
    finish(st); // a destroyed stream's work still completes
    for (size_t i = 0; i < streams.size(); i++)
        if (streams[i] == st && st != default_stream()) {
            streams.erase(streams.begin() + (long)i);
            delete st;
            break;
        }
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(void* s) {
    LOCKED;
    counts[STREAM_SYNCHRONIZE]++;
    finish(stream_of(s));
    return CUDA_SUCCESS;
}
API CUresult cuStreamQuery(void* s) {
    LOCKED;
    finish(stream_of(s));
    return CUDA_SUCCESS;
}

API CUresult cuEventCreate(void** e, unsigned flags) {
    LOCKED;
    Event* ev = new Event;
    ev->flags = flags;
    *e = ev;
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy_v2(void* e) {
    LOCKED;
    Event* ev = (Event*)e;
    if (!ev || ev->destroyed) return CUDA_ERROR_INVALID_HANDLE;
    ev->destroyed = true;
    release(ev);
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord(void* e, void* s) {
    LOCKED;
    Event* ev = (Event*)e;
    if (!ev || ev->destroyed) return CUDA_ERROR_INVALID_HANDLE;
    unsigned long long n = ++ev->recorded;
    ev->uses++;
    enqueue(s, [ev, n] {
        ev->completed = n > ev->completed ? n : ev->completed;
        ev->at_ms = now_ms();
        release(ev);
    });
    return CUDA_SUCCESS;
}
API CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
API CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    LOCKED;
    Event* ev = (Event*)e;
    if (!ev || ev->destroyed) return CUDA_ERROR_INVALID_HANDLE;
    ev->uses++;
    stream_of(s)->ops.push_back(Op{nullptr, ev, ev->recorded});
    return CUDA_SUCCESS;
}
API CUresult cuEventSynchronize(void* e) {
    LOCKED;
    Event* ev = (Event*)e;
    if (!ev || ev->destroyed) return CUDA_ERROR_INVALID_HANDLE;
    counts[EVENT_SYNCHRONIZE]++;
    unsigned long long n = ev->recorded;
    run_until([ev, n] { return ev->completed >= n; });
    return CUDA_SUCCESS;
}
API CUresult cuEventQuery(void* e) { return cuEventSynchronize(e); }
API CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    LOCKED;
    Event *s = (Event*)a, *e = (Event*)b;
    if (!s || !e || (s->flags & 2) || (e->flags & 2)) return CUDA_ERROR_INVALID_HANDLE; // timing disabled
    if (s->completed < s->recorded || e->completed < e->recorded || !s->completed || !e->completed)
        return CUDA_ERROR_NOT_READY;
    *ms = (float)(e->at_ms - s->at_ms);
    return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

API CUresult cuMemAlloc_v2(CUdeviceptr* d, size_t bytes) {
    LOCKED;
    return device_alloc(d, bytes);
}
API CUresult cuMemAllocAsync(CUdeviceptr* d, size_t bytes, void*) {
    LOCKED;
    return device_alloc(d, bytes);
}
API CUresult cuMemFree_v2(CUdeviceptr d) {
    LOCKED;
    counts[MEM_FREE_SYNC]++;
    run_all(); // as cuMemFree does, the device is idle first
    return device_free(d);
}
API CUresult cuMemFreeAsync(CUdeviceptr d, void* s) {
    LOCKED;
    if (!device_mem.count((uintptr_t)d)) return CUDA_ERROR_INVALID_VALUE;
    enqueue(s, [d] { device_free(d); });
    return CUDA_SUCCESS;
}
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    LOCKED;
    *total = total_bytes();
    *free_bytes = total_bytes() - device_in_use;
    return CUDA_SUCCESS;
}

static CUresult host_alloc(void** p, size_t bytes) {
    LOCKED;
    void* m = aligned_alloc(4096, (bytes + 4095) / 4096 * 4096 + 4096);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    pinned_mem[(uintptr_t)m] = bytes;
    *p = m;
    return CUDA_SUCCESS;
}
API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) { return host_alloc(p, bytes); }
API CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return host_alloc(p, bytes); }
API CUresult cuMemFreeHost(void* p) {
    LOCKED;
    if (!pinned_mem.count((uintptr_t)p)) return CUDA_ERROR_INVALID_VALUE;
    run_all();
    pinned_mem.erase((uintptr_t)p);
    free(p);
    return CUDA_SUCCESS;
}
API CUresult cuMemHostRegister_v2(void* p, size_t bytes, unsigned) {
    LOCKED;
    if (!p || !bytes) return CUDA_ERROR_INVALID_VALUE;
    auto next = pinned_mem.lower_bound((uintptr_t)p);
    if (inside(pinned_mem, (uintptr_t)p, 1) || (next != pinned_mem.end() && next->first < (uintptr_t)p + bytes))
        return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    pinned_mem[(uintptr_t)p] = bytes;
    return CUDA_SUCCESS;
}
API CUresult cuMemHostUnregister(void* p) {
    LOCKED;
    if (!pinned_mem.count((uintptr_t)p)) return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    run_all();
    pinned_mem.erase((uintptr_t)p);
    return CUDA_SUCCESS;
}
API CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr* d, void* p, unsigned) {
    *d = (CUdeviceptr)p;
    return CUDA_SUCCESS;
}

// A copy `what` of `n` bytes whose device side(s) must lie inside live allocations.
static CUresult check_device(const char* what, CUdeviceptr d, size_t n) {
    if (n == 0 || inside(device_mem, (uintptr_t)d, n)) return CUDA_SUCCESS;
    fprintf(stderr, "weir's emulated CUDA device: %s of %zu bytes at %#llx is outside every device allocation\n", what,
            n, d);
    return CUDA_ERROR_INVALID_VALUE;
}

static CUresult h2d(CUdeviceptr dst, const void* src, size_t n, void* s) {
    if (CUresult r = check_device("a copy to the device", dst, n)) return r;
    if (inside(pinned_mem, (uintptr_t)src, n)) {
        counts[H2D_PINNED]++;
        enqueue(s, [dst, src, n] { memcpy((void*)dst, src, n); });
    } else {
        counts[H2D_PAGEABLE]++;
        auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
        enqueue(s, [dst, staged] { memcpy((void*)dst, staged->data(), staged->size()); });
    }
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* s) {
    LOCKED;
    return h2d(dst, src, n, s);
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    LOCKED;
    CUresult r = h2d(dst, src, n, nullptr);
    if (r == CUDA_SUCCESS) finish(default_stream());
    return r;
}
static CUresult d2h(void* dst, CUdeviceptr src, size_t n, void* s) {
    if (CUresult r = check_device("a copy from the device", src, n)) return r;
    counts[D2H]++;
    enqueue(s, [dst, src, n] { memcpy(dst, (const void*)src, n); });
    // Into pageable memory the call returns once the copy is done.
    if (!inside(pinned_mem, (uintptr_t)dst, n)) finish(stream_of(s));
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* s) {
    LOCKED;
    return d2h(dst, src, n, s);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    LOCKED;
    CUresult r = d2h(dst, src, n, nullptr);
    if (r == CUDA_SUCCESS) finish(default_stream());
    return r;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s) {
    LOCKED;
    if (CUresult r = check_device("a copy on the device (to)", dst, n)) return r;
    if (CUresult r = check_device("a copy on the device (from)", src, n)) return r;
    enqueue(s, [dst, src, n] { memmove((void*)dst, (const void*)src, n); });
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult r = cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
    LOCKED;
    finish(default_stream());
    return r;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* s) {
    LOCKED;
    if (CUresult r = check_device("a memset", dst, n)) return r;
    enqueue(s, [dst, v, n] { memset((void*)dst, v, n); });
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    CUresult r = cuMemsetD8Async(dst, v, n, nullptr);
    LOCKED;
    finish(default_stream());
    return r;
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* s) {
    LOCKED;
    if (CUresult r = check_device("a memset", dst, n * 4)) return r;
    enqueue(s, [dst, v, n] {
        for (size_t i = 0; i < n; i++) ((unsigned*)dst)[i] = v;
    });
    return CUDA_SUCCESS;
}

API CUresult cuModuleLoadData(void** m, const void* image) {
    LOCKED;
    const char* text = (const char*)image;
    if (!text || strncmp(text, PTX_MARK, strlen(PTX_MARK)) != 0) {
        fprintf(stderr, "weir's emulated CUDA device: it loads only its emulated NVRTC's output\n");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    Module* mod = new Module;
    for (const char* p = strstr(text, ".entry "); p; p = strstr(p + 1, ".entry ")) {
        const char* q = p + 7;
        size_t len = strcspn(q, "\n (");
        Function* f = new Function;
        f->name.assign(q, len);
        unsigned sizes[32];
        int n = weir_emu_arg_sizes(f->name.c_str(), sizes, 32);
        if (n < 0 || n > 32) {
            delete f;
            delete mod;
            return CUDA_ERROR_INVALID_IMAGE;
        }
        f->sizes.assign(sizes, sizes + n);
        mod->functions.push_back(f);
    }
    *m = mod;
    return CUDA_SUCCESS;
}
API CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
    LOCKED;
    for (Function* fn : ((Module*)m)->functions)
        if (fn->name == name) {
            *f = fn;
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_NOT_FOUND;
}
API CUresult cuModuleUnload(void*) { return CUDA_SUCCESS; } // functions stay valid: the tests are short

API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned shared, void* s, void** params, void** extra) {
    LOCKED;
    Function* fn = (Function*)f;
    if (!fn || extra) return CUDA_ERROR_INVALID_VALUE;
    unsigned long long threads = (unsigned long long)bx * by * bz;
    if (!gx || !gy || !gz || !threads || threads > 1024 || gy > 65535 || gz > 65535 || shared > 48 * 1024) {
        fprintf(stderr, "weir's emulated CUDA device: %s launched on a grid (%u, %u, %u) of blocks (%u, %u, %u)\n",
                fn->name.c_str(), gx, gy, gz, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    // The arguments are copied now, as cuLaunchKernel does: the caller's values may be gone
    // by the time the kernel runs.
    auto slots = std::make_shared<std::vector<unsigned long long>>(fn->sizes.size());
    for (size_t i = 0; i < fn->sizes.size(); i++) {
        if (fn->sizes[i] > 8) return CUDA_ERROR_NOT_SUPPORTED;
        memcpy(&(*slots)[i], params[i], fn->sizes[i]);
    }
    counts[LAUNCHES]++;
    enqueue(s, [fn, slots, gx, gy, gz, bx, by, bz] {
        std::vector<void*> args(slots->size());
        for (size_t i = 0; i < slots->size(); i++) args[i] = &(*slots)[i];
        weir_emu_launch(fn->name.c_str(), gx, gy, gz, bx, by, bz, args.data());
    });
    return CUDA_SUCCESS;
}

// The calls counted so far, in the order of `drv::Count`, into `out` (up to `n` of them);
// returns how many there are.
API int weir_emu_counts(unsigned long long* out, int n) {
    LOCKED;
    for (int i = 0; i < n && i < COUNTS; i++) out[i] = counts[i];
    return COUNTS;
}

// --- cuBLAS ------------------------------------------------------------------------------

struct Blas {
    void* stream = nullptr;
};

API int cublasCreate_v2(void** h) {
    *h = new Blas;
    return 0;
}
API int cublasDestroy_v2(void* h) {
    delete (Blas*)h;
    return 0;
}
API int cublasSetStream_v2(void* h, void* s) {
    ((Blas*)h)->stream = s;
    return 0;
}
API int cublasGetStream_v2(void* h, void** s) {
    *s = ((Blas*)h)->stream;
    return 0;
}
API int cublasSetMathMode(void*, int) { return 0; }
API int cublasSetPointerMode_v2(void*, int mode) { return mode == 0 ? 0 : 15; } // host pointers only
API int cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }

static float element(const void* p, int type, size_t i) {
    switch (type) {
    case 0: return ((const float*)p)[i];
    case 2: return f16_to_f32(((const unsigned short*)p)[i]);
    default: return __uint_as_float((unsigned)((const unsigned short*)p)[i] << 16); // 14: bf16
    }
}

// C = alpha · op(A) · op(B) + beta · C, column-major, accumulated in f32 in order of `k`.
API int cublasGemmEx(void* h, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int atype,
                     int lda, const void* B, int btype, int ldb, const void* beta, void* C, int ctype, int ldc,
                     int compute, int) {
    LOCKED;
    bool types_ok = atype == btype && (atype == 0 || atype == 2 || atype == 14) && ctype == 0 &&
                    (compute == 68 || compute == 69);
    if (!types_ok) return 15; // CUBLAS_STATUS_NOT_SUPPORTED
    if (m < 0 || n < 0 || k < 0 || transa > 1 || transb > 1 || lda < (transa ? k : m) || lda < 1 ||
        ldb < (transb ? n : k) || ldb < 1 || ldc < m || ldc < 1)
        return 7; // CUBLAS_STATUS_INVALID_VALUE
    size_t esize = atype == 0 ? 4 : 2;
    size_t a_bytes = (size_t)lda * ((transa ? m : k) - 1) * esize + (size_t)(transa ? k : m) * esize;
    size_t b_bytes = (size_t)ldb * ((transb ? k : n) - 1) * esize + (size_t)(transb ? n : k) * esize;
    size_t c_bytes = ((size_t)ldc * (n - 1) + (size_t)m) * 4;
    if (m && n && k &&
        (check_device("cuBLAS's A", (CUdeviceptr)A, a_bytes) || check_device("cuBLAS's B", (CUdeviceptr)B, b_bytes) ||
         check_device("cuBLAS's C", (CUdeviceptr)C, c_bytes)))
        return 14; // CUBLAS_STATUS_INTERNAL_ERROR, as an illegal address would end
    float al = *(const float*)alpha, be = *(const float*)beta;
    enqueue(((Blas*)h)->stream, [=] {
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                float acc = 0.0f;
                for (int l = 0; l < k; l++) {
                    float a = element(A, atype, transa ? (size_t)l + (size_t)i * lda : (size_t)i + (size_t)l * lda);
                    float b = element(B, btype, transb ? (size_t)j + (size_t)l * ldb : (size_t)l + (size_t)j * ldb);
                    acc += a * b;
                }
                float* c = (float*)C + (size_t)i + (size_t)j * ldc;
                *c = be == 0.0f ? al * acc : al * acc + be * *c; // beta 0: C is not read
            }
    });
    return 0;
}

// --- NVRTC -------------------------------------------------------------------------------

struct Program {
    std::string source, ptx, log;
};

static unsigned long long fnv(const char* s) {
    unsigned long long h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

API int nvrtcVersion(int* major, int* minor) {
    *major = 13, *minor = 0;
    return 0;
}
API const char* nvrtcGetErrorString(int r) { return r == 0 ? "NVRTC_SUCCESS" : "NVRTC_ERROR_COMPILATION"; }
API int nvrtcCreateProgram(void** p, const char* src, const char*, int, const char* const*, const char* const*) {
    Program* prog = new Program;
    prog->source = src ? src : "";
    *p = prog;
    return 0;
}
API int nvrtcDestroyProgram(void** p) {
    delete (Program*)*p;
    *p = nullptr;
    return 0;
}
// "Compiles" the one source the emulator runs: weir.cu as this library was built from it.
API int nvrtcCompileProgram(void* p, int, const char* const*) {
    Program* prog = (Program*)p;
    if (fnv(prog->source.c_str()) != WEIR_SOURCE_FNV) {
        prog->log = "weir's emulated NVRTC runs only the weir.cu it was built with, and this source is not it";
        return 6; // NVRTC_ERROR_COMPILATION
    }
    prog->ptx = std::string(PTX_MARK) + ": weir.cu's kernels, run on the CPU\n";
#define WEIR_ENTRY(k) prog->ptx += ".entry " #k "()\n";
    WEIR_EMU_KERNELS(WEIR_ENTRY)
    return 0;
}
API int nvrtcGetPTXSize(void* p, size_t* n) {
    *n = ((Program*)p)->ptx.size() + 1;
    return 0;
}
API int nvrtcGetPTX(void* p, char* out) {
    memcpy(out, ((Program*)p)->ptx.c_str(), ((Program*)p)->ptx.size() + 1);
    return 0;
}
API int nvrtcGetProgramLogSize(void* p, size_t* n) {
    *n = ((Program*)p)->log.size() + 1;
    return 0;
}
API int nvrtcGetProgramLog(void* p, char* out) {
    memcpy(out, ((Program*)p)->log.c_str(), ((Program*)p)->log.size() + 1);
    return 0;
}
