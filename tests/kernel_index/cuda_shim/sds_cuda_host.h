// Host stand-in for the CUDA runtime, so that cuda/norm.cu and cuda/pointwise.cu (the kernel
// sources themselves, unchanged) compile with the host C++ compiler and run on the CPU in
// `cargo test` (tests/activation_host.rs). A launch runs the grid block by block; the threads of
// a block are cooperative fibers (ucontext) that switch only at __syncthreads and warp shuffles,
// so barrier and shuffle semantics hold exactly as the kernels rely on them (threads that exited
// no longer count towards a barrier, as on the GPU). `__shared__` becomes `static`, which is
// block-shared because blocks run one after another.
//
// What this cannot show (GPU-only): timing, memory-model and coalescing effects, the device's own
// math library (erff / expf / sinf / rsqrtf here are the host's), and FMA contraction choices.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace sds_host {

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};

struct Fiber {
    ucontext_t ctx;
    Dim3 tid;
    bool done = false;
    // Set while the fiber waits at a barrier: it is not resumed until *wait_gen != wait_val.
    const unsigned* wait_gen = nullptr;
    unsigned wait_val = 0;
};

struct Runtime {
    Dim3 block_idx, block_dim, grid_dim;
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;
    ucontext_t sched;
    int cur = 0;
    const std::function<void()>* body = nullptr;
    // Block barrier and one barrier + shuffle slots per warp.
    unsigned block_arrived = 0, block_gen = 0;
    std::vector<unsigned> warp_arrived, warp_gen;
    std::vector<uint64_t> slots;
};

inline Runtime& rt() {
    static thread_local Runtime r;  // tests launch from several threads at once
    return r;
}

inline void yield() {
    Runtime& r = rt();
    swapcontext(&r.fibers[r.cur].ctx, &r.sched);
}

inline unsigned live(unsigned first, unsigned count) {
    const Runtime& r = rt();
    unsigned n = 0;
    for (unsigned i = first; i < first + count && i < r.fibers.size(); ++i) n += !r.fibers[i].done;
    return n;
}

// Waits until every live thread of [first, first + count) arrived (arrived / gen are that group's).
// The last thread to arrive releases the others; so does the scheduler when a thread exits
// while others wait (release_exited).
inline void barrier(unsigned& arrived, unsigned& gen, unsigned first, unsigned count) {
    const unsigned my_gen = gen;
    ++arrived;
    if (arrived >= live(first, count)) {
        arrived = 0;
        ++gen;
        return;
    }
    Runtime& r = rt();
    Fiber& f = r.fibers[r.cur];
    f.wait_gen = &gen;
    f.wait_val = my_gen;
    while (gen == my_gen) yield();
    f.wait_gen = nullptr;
}

inline void release_if_complete(unsigned& arrived, unsigned& gen, unsigned first, unsigned count) {
    if (arrived > 0 && arrived >= live(first, count)) {
        arrived = 0;
        ++gen;
    }
}

inline void release_exited() {
    Runtime& r = rt();
    const unsigned n = static_cast<unsigned>(r.fibers.size());
    release_if_complete(r.block_arrived, r.block_gen, 0, n);
    for (unsigned w = 0; w < r.warp_arrived.size(); ++w) release_if_complete(r.warp_arrived[w], r.warp_gen[w], w * 32, 32);
}

inline unsigned linear_tid() { return rt().fibers[rt().cur].tid.x; }

inline void syncthreads() {
    Runtime& r = rt();
    barrier(r.block_arrived, r.block_gen, 0, static_cast<unsigned>(r.fibers.size()));
}

template <typename T>
inline T shfl_xor(T v, int off) {
    static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes here");
    Runtime& r = rt();
    const unsigned t = linear_tid(), w = t / 32, lane = t % 32;
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    r.slots[t] = bits;
    barrier(r.warp_arrived[w], r.warp_gen[w], w * 32, 32);
    const unsigned src = w * 32 + (lane ^ static_cast<unsigned>(off));
    T out;
    memcpy(&out, &r.slots[src], sizeof(T));
    barrier(r.warp_arrived[w], r.warp_gen[w], w * 32, 32);
    return out;
}

inline void trampoline() {
    Runtime& r = rt();
    (*r.body)();
    r.fibers[r.cur].done = true;
    // Returning ends the fiber through uc_link (the scheduler).
}

// Runs `kernel` over grid (gx, gy) with `bx` threads per block (1-D blocks, as every kernel here).
inline void launch(const std::function<void()>& kernel, unsigned gx, unsigned gy, unsigned bx) {
    constexpr size_t kStack = 64 * 1024;
    Runtime& r = rt();
    r.body = &kernel;
    r.grid_dim = {gx, gy, 1};
    r.block_dim = {bx, 1, 1};
    if (r.stacks.size() < bx) r.stacks.resize(bx, std::vector<char>(kStack));
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned b = 0; b < gx; ++b) {
            r.block_idx = {b, by, 0};
            r.fibers.assign(bx, Fiber{});
            r.block_arrived = 0;
            r.warp_arrived.assign((bx + 31) / 32, 0);
            r.warp_gen.assign((bx + 31) / 32, 0);
            r.slots.assign(bx + 32, 0);
            for (unsigned t = 0; t < bx; ++t) {
                Fiber& f = r.fibers[t];
                f.tid = {t, 0, 0};
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = r.stacks[t].data();
                f.ctx.uc_stack.ss_size = kStack;
                f.ctx.uc_link = &r.sched;
                makecontext(&f.ctx, trampoline, 0);
            }
            bool pending = true;
            while (pending) {
                pending = false;
                for (unsigned t = 0; t < bx; ++t) {
                    Fiber& f = r.fibers[t];
                    if (f.done) continue;
                    pending = true;
                    if (f.wait_gen != nullptr && *f.wait_gen == f.wait_val) continue;  // still blocked
                    r.cur = static_cast<int>(t);
                    swapcontext(&r.sched, &f.ctx);
                    if (f.done) release_exited();
                }
            }
        }
    }
}

}  // namespace sds_host

#define threadIdx (sds_host::rt().fibers[sds_host::rt().cur].tid)
#define blockIdx (sds_host::rt().block_idx)
#define blockDim (sds_host::rt().block_dim)
#define gridDim (sds_host::rt().grid_dim)
#define __syncthreads() sds_host::syncthreads()
#define __shfl_xor_sync(mask, v, off) sds_host::shfl_xor((v), (off))

inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
