// weir's GPU kernels, compiled at start-up by NVRTC (kernels/src/cuda/mod.rs).
//
// Activations are f32, as on the CPU lanes; weights and KV caches are f32, bf16 or f16, named
// by a `dtype` argument (0 f32, 1 bf16, 2 f16: `Dtype` in mod.rs) and read as raw 16-bit
// patterns, so the file needs no CUDA header. Each kernel computes what its CPU counterpart in
// kernels/src does, in the same order of f32 operations where that order is visible (RoPE's
// angle, the attention scale, RMSNorm's mean): the tests compare them on random shapes.
//
// Build options (mod.rs): no fast math, so expf, cosf, sinf and sqrtf are the precise ones.

#define WEIR_F32 0
#define WEIR_BF16 1
#define WEIR_F16 2

// NVRTC compiles without the C library's headers, so no INFINITY macro.
#define WEIR_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((b >> 16) | 0x40u); // NaN stays NaN (quiet)
    }
    b += 0x7fffu + ((b >> 16) & 1u); // round to nearest even
    return (unsigned short)(b >> 16);
}

// PTX has the f16 conversions; the CPU emulator of the tests (emu.cpp) brings its own.
#ifndef WEIR_EMU
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// Element i of an array of `dtype`, as f32.
__device__ __forceinline__ float load_as_f32(const void* p, size_t i, int dtype) {
    if (dtype == WEIR_F32) return ((const float*)p)[i];
    unsigned short h = ((const unsigned short*)p)[i];
    return dtype == WEIR_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

__device__ __forceinline__ void store_from_f32(void* p, size_t i, int dtype, float v) {
    if (dtype == WEIR_F32) {
        ((float*)p)[i] = v;
    } else {
        ((unsigned short*)p)[i] = dtype == WEIR_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
}

// The sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), given to every
// thread. `scratch` holds 32 floats; the block must call this uniformly.
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -WEIR_INF;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// out[t, :] = table[ids[t], :] as f32. Grid: tokens.
extern "C" __global__ void embed(const int* ids, const void* table, int dtype, float* out, int dim) {
    size_t row = (size_t)ids[blockIdx.x] * dim;
    float* o = out + (size_t)blockIdx.x * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) o[d] = load_as_f32(table, row + d, dtype);
}

// y[r, :] = w * x[r, :] / sqrt(mean(x[r, :]^2) + eps). Grid: rows.
extern "C" __global__ void rmsnorm(const float* x, const float* w, float* y, int dim, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) ss += xr[d] * xr[d];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) yr[d] = w[d] * (xr[d] * inv);
}

// Rotates every head of x[t, :] ([heads, head_dim], "rotate half": i pairs with i + half) for
// position pos[t], in place. Grid: tokens.
extern "C" __global__ void rope(float* x, const int* pos, const float* inv_freq, int heads, int head_dim) {
    int half = head_dim / 2;
    float* xr = x + (size_t)blockIdx.x * heads * head_dim;
    float p = (float)pos[blockIdx.x];
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
        int h = j / half, i = j % half;
        float a = p * inv_freq[i];
        float c = cosf(a), s = sinf(a);
        float* hx = xr + h * head_dim;
        float x1 = hx[i], x2 = hx[i + half];
        hx[i] = x1 * c - x2 * s;
        hx[i + half] = x2 * c + x1 * s;
    }
}

// gate = silu(gate) * up, elementwise.
extern "C" __global__ void silu_mul(float* gate, const float* up, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// a += b, elementwise.
extern "C" __global__ void add(float* a, const float* b, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        a[i] += b[i];
    }
}

// Each row of y ([rows, n]) += b ([n]): a linear layer's bias.
extern "C" __global__ void add_bias(float* y, const float* b, int n, size_t total) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        y[i] += b[i % n];
    }
}

// y = x rounded to `dtype` (bf16 or f16, nearest even): a GEMM's input in its weights' type.
extern "C" __global__ void narrow(const float* x, void* y, int dtype, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        store_from_f32(y, i, dtype, x[i]);
    }
}

// out[r, :] = x[idx[r], :]: the rows of the tokens routed to one expert. Grid: rows.
extern "C" __global__ void gather_rows(const float* x, const int* idx, float* out, int width) {
    const float* xr = x + (size_t)idx[blockIdx.x] * width;
    float* o = out + (size_t)blockIdx.x * width;
    for (int d = threadIdx.x; d < width; d += blockDim.x) o[d] = xr[d];
}

// y[idx[r], :] = w[r] * rows[r, :]: an expert's outputs, weighted, back in their tokens' rows
// (a token comes to an expert at most once, so no two rows write the same place). Grid: rows.
extern "C" __global__ void scatter_rows(const float* rows, const int* idx, const float* w, float* y, int width) {
    const float* r = rows + (size_t)blockIdx.x * width;
    float* yr = y + (size_t)idx[blockIdx.x] * width;
    float s = w[blockIdx.x];
    for (int d = threadIdx.x; d < width; d += blockDim.x) yr[d] = r[d] * s;
}

// x[t, :] *= sigmoid(g[t]): a gated branch (Qwen2-MoE's shared expert). Grid: tokens.
extern "C" __global__ void sigmoid_gate(float* x, const float* g, int dim) {
    float s = 1.0f / (1.0f + expf(-g[blockIdx.x]));
    float* xr = x + (size_t)blockIdx.x * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) xr[d] *= s;
}

// Stores token t's keys and values (k, v: [tokens, kv_dim] f32) into a paged cache: the block
// at device address block[t], position offset[t] in it. A block holds its positions' keys,
// then their values: [2, block_tokens, kv_dim] of `dtype`, as the CPU cache; blocks are
// separate allocations from the GPU pool, so a sequence's cache grows a block at a time.
// Grid: tokens.
extern "C" __global__ void kv_store(const float* k, const float* v, int dtype, const unsigned long long* block,
                                    const int* offset, int kv_dim, int block_tokens) {
    void* b = (void*)block[blockIdx.x];
    size_t base = (size_t)offset[blockIdx.x] * kv_dim;
    size_t vbase = base + (size_t)block_tokens * kv_dim;
    const float* kr = k + (size_t)blockIdx.x * kv_dim;
    const float* vr = v + (size_t)blockIdx.x * kv_dim;
    for (int d = threadIdx.x; d < kv_dim; d += blockDim.x) {
        store_from_f32(b, base + d, dtype, kr[d]);
        store_from_f32(b, vbase + d, dtype, vr[d]);
    }
}

#define ATTN_THREADS 128
#define ATTN_MAX_HEAD_DIM 256
#define ATTN_DIMS (ATTN_MAX_HEAD_DIM / ATTN_THREADS)

// Fused attention over a paged cache, one query row and head per thread block (grid: rows,
// heads; ATTN_THREADS threads). Row r sits at position pos[r] of its sequence, whose blocks'
// device addresses are table[table_start[r] ..]; it sees positions lo ..= pos[r], lo = 0 or, with a sliding
// window w > 0, pos[r] + 1 - w. Positions are taken a tile of ATTN_THREADS at a time: each
// thread scores one, the tile's softmax weights join a running (max, sum) — the online
// softmax, stable for any length — and each thread accumulates its dimensions of the
// weighted sum of values. q, out: [rows, heads * head_dim].
extern "C" __global__ void attend(const float* q, float* out, int dtype, const unsigned long long* table,
                                  const int* table_start, const int* pos, int heads, int kv_heads, int head_dim,
                                  int block_tokens, int window) {
    __shared__ float qs[ATTN_MAX_HEAD_DIM];
    __shared__ float ws[ATTN_THREADS];
    __shared__ const void* vrows[ATTN_THREADS];
    __shared__ float scratch[32];
    int r = blockIdx.x, h = blockIdx.y;
    int kvh = h / (heads / kv_heads);
    int kv_dim = kv_heads * head_dim;
    const float* qr = q + ((size_t)r * heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = qr[d];
    __syncthreads();
    int p = pos[r];
    int lo = window > 0 && p + 1 > window ? p + 1 - window : 0;
    const unsigned long long* tab = table + table_start[r];
    float scale = 1.0f / sqrtf((float)head_dim);
    float m = -WEIR_INF, l = 0.0f;
    // This thread's dimensions of the weighted sum: d = j * ATTN_THREADS + threadIdx.x (loops
    // over j fully unrolled, so the array stays in registers).
    float acc[ATTN_DIMS];
#pragma unroll
    for (int j = 0; j < ATTN_DIMS; j++) acc[j] = 0.0f;
    for (int t0 = lo; t0 <= p; t0 += ATTN_THREADS) {
        int i = t0 + threadIdx.x;
        float s = -WEIR_INF;
        if (i <= p) {
            const void* blk = (const void*)tab[i / block_tokens];
            int off = i % block_tokens;
            size_t kb = (size_t)off * kv_dim + (size_t)kvh * head_dim;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++) dot += qs[d] * load_as_f32(blk, kb + d, dtype);
            s = dot * scale;
            // Its value row: past the block's keys, at the same offset.
            size_t vrow = ((size_t)block_tokens + off) * kv_dim + (size_t)kvh * head_dim;
            vrows[threadIdx.x] = (const char*)blk + vrow * (dtype == WEIR_F32 ? 4 : 2);
        }
        float tile_max = block_max(s, scratch);
        float m_new = fmaxf(m, tile_max);
        float w = i <= p ? expf(s - m_new) : 0.0f;
        ws[threadIdx.x] = w;
        float correction = expf(m - m_new); // 0 on the first tile (m = -infinity)
        l = l * correction + block_sum(w, scratch);
        m = m_new;
        __syncthreads();
        int n = min(ATTN_THREADS, p + 1 - t0);
#pragma unroll
        for (int j = 0; j < ATTN_DIMS; j++) {
            int d = j * ATTN_THREADS + threadIdx.x;
            if (d >= head_dim) break;
            float a = acc[j] * correction;
            for (int e = 0; e < n; e++) {
                a += ws[e] * load_as_f32(vrows[e], d, dtype);
            }
            acc[j] = a;
        }
        __syncthreads();
    }
    float* o = out + ((size_t)r * heads + h) * head_dim;
#pragma unroll
    for (int j = 0; j < ATTN_DIMS; j++) {
        int d = j * ATTN_THREADS + threadIdx.x;
        if (d < head_dim) o[d] = acc[j] / l;
    }
}

// The block's largest (value, index) over each thread's (bv, bi) — the lower index among
// equal values — left in best_v[0], best_i[0] (shared arrays of blockDim.x, a power of two).
__device__ void block_best(float bv, int bi, float* best_v, int* best_i) {
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) {
            float v = best_v[threadIdx.x + s];
            int i = best_i[threadIdx.x + s];
            if (v > best_v[threadIdx.x] || (v == best_v[threadIdx.x] && i < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = v;
                best_i[threadIdx.x] = i;
            }
        }
        __syncthreads();
    }
}

// The index of each row's largest logit, the lowest index on ties (as the CPU sampler).
// Grid: rows.
extern "C" __global__ void argmax(const float* logits, int vocab, int* out) {
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    const float* x = logits + (size_t)blockIdx.x * vocab;
    float bv = -WEIR_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = x[i];
        if (v > bv) { bv = v; bi = i; } // strictly greater: the first of equal ones stays
    }
    block_best(bv, bi, best_v, best_i);
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0] == 0x7fffffff ? 0 : best_i[0];
}

#define TOPK_MAX 64

// Each row's k largest logits (k <= TOPK_MAX), largest first, the lower index first among
// equal ones: the candidates the host's sampler draws from. Grid: rows; blockDim.x a power
// of two <= 1024.
extern "C" __global__ void top_k(const float* logits, int vocab, int k, int* ids, float* vals) {
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    __shared__ int taken[TOPK_MAX];
    const float* x = logits + (size_t)blockIdx.x * vocab;
    for (int round = 0; round < k; round++) {
        float bv = -WEIR_INF;
        int bi = 0x7fffffff;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            bool used = false;
            for (int j = 0; j < round; j++) used |= taken[j] == i;
            float v = x[i];
            if (!used && (v > bv || (v == bv && i < bi))) { bv = v; bi = i; }
        }
        block_best(bv, bi, best_v, best_i);
        if (threadIdx.x == 0) {
            taken[round] = best_i[0];
            ids[(size_t)blockIdx.x * k + round] = best_i[0];
            vals[(size_t)blockIdx.x * k + round] = best_v[0];
        }
        __syncthreads();
    }
}
