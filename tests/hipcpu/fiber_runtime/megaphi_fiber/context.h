// Switching between fibers: each fiber has its own stack, and a switch saves the registers the caller
// must find unchanged (the callee-saved ones) on the current stack and continues on another.
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace megaphi_fiber {

#if defined(__x86_64__)

// ucontext's swapcontext does the same plus two sigprocmask system calls per switch, which took half
// the kernel tests' time. The six pushes mirror the six pops that start_context lays out for a new fiber.
extern "C" inline __attribute__((naked, noinline, noipa)) void megaphi_fiber_switch_stack(void** /*save_sp*/,
                                                                                         void* /*load_sp*/) {
    asm volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}

struct Context {
    void* stack_pointer = nullptr;
};

// The first switch to `context` enters `entry`, which must never return.
inline void start_context(Context& context, unsigned char* stack, std::size_t bytes, void (*entry)()) {
    const std::uintptr_t top = reinterpret_cast<std::uintptr_t>(stack + bytes) & ~std::uintptr_t{15};
    // `ret` pops entry's address from a 16-byte aligned slot, leaving the stack as a call would (rsp = 8
    // mod 16); below it, six zeroed callee-saved registers for the pops.
    void** slots = reinterpret_cast<void**>(top - 16);
    slots[0] = reinterpret_cast<void*>(entry);
    slots[1] = nullptr;
    void** saved = slots - 6;
    for (int i = 0; i < 6; ++i) saved[i] = nullptr;
    context.stack_pointer = saved;
}

inline void switch_context(Context& from, Context& to) {
    megaphi_fiber_switch_stack(&from.stack_pointer, to.stack_pointer);
    asm volatile("" ::: "memory");  // another fiber ran: globals (threadIdx, shared memory) may have changed
}

#else  // portable, slower

struct Context {
    ucontext_t context;
};

inline void start_context(Context& context, unsigned char* stack, std::size_t bytes, void (*entry)()) {
    getcontext(&context.context);
    context.context.uc_stack.ss_sp = stack;
    context.context.uc_stack.ss_size = bytes;
    context.context.uc_link = nullptr;
    makecontext(&context.context, entry, 0);
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

#endif

}  // namespace megaphi_fiber
