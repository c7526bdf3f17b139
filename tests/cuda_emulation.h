// A small emulation of the CUDA execution model, enough to compile nanopeft/kernels/nf4.cu with the host
// C++ compiler and run it on CPU memory (tests/test_nf4_cuda.py). The blocks of a grid run one after
// another; the threads of a block are coroutines (ucontext) on one host thread, each run until it
// reaches __syncthreads or returns, so a barrier holds exactly as on the GPU: no thread passes it
// before every live thread of its block has arrived. __shared__ arrays are per kernel (one block runs
// at a time). The fp32 intrinsics are the plain IEEE operations (compile with -ffp-contract=off, so
// nothing is fused into an FMA).
#pragma once
#include <ucontext.h>

#include <cstring>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct EmulatedDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;

struct EmulatedBlock {
    ucontext_t scheduler;
    std::vector<ucontext_t> threads;
    std::vector<char> done;
    unsigned current = 0;
};
inline EmulatedBlock emulated;

inline void __syncthreads() {  // back to the scheduler, which resumes this thread once all have arrived
    swapcontext(&emulated.threads[emulated.current], &emulated.scheduler);
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }

// A fresh coroutine that runs body() on its own stack, then returns to the scheduler. (Its own function:
// getcontext returns twice, which would clobber the caller's loop variables.)
[[gnu::noinline]] inline void emulated_thread(ucontext_t& c, char* stack, std::size_t size, void (*body)()) {
    getcontext(&c);
    c.uc_stack.ss_sp = stack;
    c.uc_stack.ss_size = size;
    c.uc_link = &emulated.scheduler;
    makecontext(&c, body, 0);
}

// kernel<<<grid, block>>>(*args[0], *args[1], ...), args laid out like cuLaunchKernel's kernelParams:
// one pointer per argument, to a value of the argument's type.
template <class... A, std::size_t... I>
void emulate_launch(void (*kernel)(A...), unsigned grid, unsigned block, void** args, std::index_sequence<I...>) {
    static void (*run)(A...);
    static void** argv;
    run = kernel, argv = args;
    auto body = +[] {
        run(*static_cast<A*>(argv[I])...);
        emulated.done[emulated.current] = 1;  // returning resumes uc_link: the scheduler
    };
    constexpr std::size_t stack = 1 << 16;
    std::vector<char> stacks(stack * block);
    gridDim.x = grid, blockDim.x = block;
    emulated.threads.assign(block, ucontext_t());
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        emulated.done.assign(block, 0);
        for (unsigned t = 0; t < block; ++t)
            emulated_thread(emulated.threads[t], stacks.data() + t * stack, stack, body);
        for (bool live = true; live;) {  // one pass per __syncthreads phase
            live = false;
            for (unsigned t = 0; t < block; ++t) {
                if (emulated.done[t]) continue;
                emulated.current = t, threadIdx.x = t;
                swapcontext(&emulated.scheduler, &emulated.threads[t]);
                live = live || !emulated.done[t];
            }
        }
    }
}

// extern "C" void launch_NAME(unsigned grid, unsigned block, void** args): one per kernel, for ctypes
#define EMULATE_KERNEL(NAME)                                                              \
    extern "C" void launch_##NAME(unsigned grid, unsigned block, void** args) {           \
        emulate_launch(NAME, grid, block, args, std::make_index_sequence<kernel_arity(NAME)>()); \
    }
template <class... A>
constexpr std::size_t kernel_arity(void (*)(A...)) {
    return sizeof...(A);
}
