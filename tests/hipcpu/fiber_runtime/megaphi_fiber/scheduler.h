// Blocks, fibers, barriers and launches of megaphi's fiber runtime, built to expose what a fixed,
// friendly order of execution hides (a GPU promises no order between barriers):
// - Schedules. The runnable fiber with the smallest priority key runs until it reaches a barrier or
//   ends, so one warp runs ahead of the others as far as its barriers let it. Keys: `forward` thread
//   index order, `reverse` the highest index first, `random` seeded random keys near the current
//   step count, drawn again every time the block's barrier releases (near "now", so that fibers
//   released late mix with those still waiting instead of all running before them). A missing
//   barrier after shared-memory writers (readers run before the writers) or before shared memory is
//   reused (a warp runs ahead into the next use while others still read) then changes the results.
// - Blocks interleave: kResidentBlocks blocks run at a time, their threads' steps interleaved by the
//   keys (forward: block by block after the last resident one, reverse and random: in reverse and
//   random order), and the next block starts when one ends.
// - Shared memory holds fresh garbage in every block: random bytes, static (`__shared__`) and dynamic
//   alike, and each resident block has its own copy of both.
// - A launch whose static plus dynamic shared memory exceeds 48 KiB per block fails (a GPU's limit
//   without an opt-in), as does one with more than 1024 threads per block or an empty grid.
// Deterministic: the same schedule and seed interleave the same launch the same way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <queue>
#include <vector>

#include "context.h"
#include "static_shared.h"

namespace megaphi_fiber {

constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned kWarpSize = 32;
constexpr unsigned kResidentBlocks = 3;
constexpr std::size_t kStackBytes = 64 * 1024;
constexpr std::size_t kSharedBytesPerBlock = 48 * 1024;
constexpr std::size_t kShuffleSlotBytes = 16;

enum class Order { forward = 0, reverse = 1, random = 2 };

struct Schedule {
    Order order = Order::random;
    std::uint64_t rng = 0x9E3779B97F4A7C15ull;
};

inline Schedule& schedule() {
    static Schedule current;
    return current;
}

inline std::uint64_t next_random(std::uint64_t& state) {  // splitmix64
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline void set_schedule(Order order, std::uint64_t seed) {
    schedule().order = order;
    schedule().rng = seed;
}

struct Block;

struct Fiber {
    Context context;
    Block* block = nullptr;
    unsigned linear = 0;  // thread index within the block
    dim3 index;
    std::uint64_t key = 0;
};

struct Scope {  // the block ([0]) or one warp: who must arrive before a barrier releases
    unsigned live = 0;
    std::vector<Fiber*> waiting;
};

struct Block {
    dim3 index;
    unsigned slot = 0;
    unsigned remaining = 0;
    std::vector<Fiber> fibers;
    std::vector<Scope> scopes;  // [0] the block, [1 + w] warp w
    std::vector<unsigned char> static_image, dynamic_shared, shuffle_slots;
};

// Ordered by key, ties by (slot, thread): never by address, which would differ from run to run.
struct Runnable {
    std::uint64_t key, tie;
    Fiber* fiber;
    bool operator>(const Runnable& other) const { return key != other.key ? key > other.key : tie > other.tie; }
};

inline Runnable runnable_entry(Fiber* fiber) {
    const std::uint64_t tie = static_cast<std::uint64_t>(fiber->block->slot) * kMaxBlockThreads + fiber->linear;
    return Runnable{fiber->key, tie, fiber};
}

struct Launch {
    const std::function<void()>* body = nullptr;
    const StaticShared* statics = nullptr;
    Context scheduler;
    Fiber* current = nullptr;
    Block* statics_owner = nullptr;  // the block whose copy of the static shared memory is in place
    std::uint64_t steps = 0;  // fibers resumed so far in this launch: the clock random keys are drawn near
    std::priority_queue<Runnable, std::vector<Runnable>, std::greater<Runnable>> runnable;
    std::vector<std::unique_ptr<unsigned char[]>> stacks;  // [slot * kMaxBlockThreads + thread], reused
};

inline Launch& active() {
    static Launch launch;
    return launch;
}

inline Block& current_block() { return *active().current->block; }
inline void* dynamic_shared_memory() { return current_block().dynamic_shared.data(); }
inline void* shuffle_slots() { return current_block().shuffle_slots.data(); }

inline void fill_with_garbage(std::vector<unsigned char>& bytes) {
    for (std::size_t i = 0; i < bytes.size(); i += 8) {
        const std::uint64_t word = next_random(schedule().rng);
        std::memcpy(bytes.data() + i, &word, std::min<std::size_t>(8, bytes.size() - i));
    }
}

inline std::uint64_t random_key() {  // within a few times the resident threads of "now"
    const std::uint64_t spread = 4ull * kResidentBlocks * blockDim.x * blockDim.y * blockDim.z;
    return active().steps + next_random(schedule().rng) % spread;
}

inline std::uint64_t key_for(const Block& block, unsigned linear, unsigned threads) {
    switch (schedule().order) {
        case Order::forward: return static_cast<std::uint64_t>(linear) * kResidentBlocks + block.slot;
        case Order::reverse: return static_cast<std::uint64_t>(threads - 1 - linear) * kResidentBlocks + block.slot;
        default: return random_key();
    }
}

inline void release(Scope& scope, bool new_phase) {
    Launch& launch = active();
    for (Fiber* fiber : scope.waiting) {
        if (new_phase && schedule().order == Order::random) fiber->key = random_key();
        launch.runnable.push(runnable_entry(fiber));
    }
    scope.waiting.clear();
}

// The caller waits until every live thread of its scope (0: block, 1 + w: warp w) has arrived; then all
// of them, the caller included, are runnable again and the keys decide who goes first.
inline void barrier(int scope_index) {
    Launch& launch = active();
    Fiber* self = launch.current;
    Scope& scope = self->block->scopes[scope_index];
    scope.waiting.push_back(self);
    if (scope.waiting.size() == scope.live) release(scope, scope_index == 0);
    switch_context(self->context, launch.scheduler);
}

inline void sync_block() { barrier(0); }
inline void sync_warp() { barrier(1 + static_cast<int>(active().current->linear / kWarpSize)); }

inline void fiber_entry() {
    Launch& launch = active();
    (*launch.body)();
    Fiber* self = launch.current;
    Block& block = *self->block;
    --block.remaining;
    for (int s : {0, 1 + static_cast<int>(self->linear / kWarpSize)}) {  // no longer awaited at barriers
        Scope& scope = block.scopes[s];
        --scope.live;
        if (!scope.waiting.empty() && scope.waiting.size() == scope.live) release(scope, s == 0);
    }
    switch_context(self->context, launch.scheduler);
    std::abort();  // a finished fiber is never resumed
}

inline void swap_static_shared(Block* next) {
    Launch& launch = active();
    if (launch.statics_owner == next) return;
    for (Block* block : {launch.statics_owner, next}) {
        if (block == nullptr) continue;
        std::size_t at = 0;
        for (const SharedVariable& v : launch.statics->variables) {
            if (block == next) {
                std::memcpy(v.address, block->static_image.data() + at, v.bytes);
            } else {
                std::memcpy(block->static_image.data() + at, v.address, v.bytes);
            }
            at += v.bytes;
        }
    }
    launch.statics_owner = next;
}

inline std::unique_ptr<Block> start_block(unsigned linear_block, unsigned slot, std::size_t dynamic_bytes) {
    Launch& launch = active();
    auto block = std::make_unique<Block>();
    block->index = dim3(linear_block % gridDim.x, linear_block / gridDim.x % gridDim.y,
                        linear_block / (gridDim.x * gridDim.y));
    block->slot = slot;
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    block->remaining = threads;
    const unsigned warps = (threads + kWarpSize - 1) / kWarpSize;
    block->scopes.resize(1 + warps);
    block->scopes[0].live = threads;
    for (unsigned w = 0; w < warps; ++w) block->scopes[1 + w].live = std::min(kWarpSize, threads - w * kWarpSize);
    block->static_image.resize(launch.statics->bytes);
    block->dynamic_shared.resize(std::max<std::size_t>(dynamic_bytes, 1));
    block->shuffle_slots.resize(threads * kShuffleSlotBytes);
    fill_with_garbage(block->static_image);
    fill_with_garbage(block->dynamic_shared);
    block->fibers.resize(threads);
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& fiber = block->fibers[t];
        fiber.block = block.get();
        fiber.linear = t;
        fiber.index = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
        fiber.key = key_for(*block, t, threads);
        auto& stack = launch.stacks[slot * kMaxBlockThreads + t];
        if (!stack) stack.reset(new unsigned char[kStackBytes]);
        start_context(fiber.context, stack.get(), kStackBytes, fiber_entry);
        launch.runnable.push(runnable_entry(&fiber));
    }
    return block;
}

// The order blocks start in: index order, reversed, or shuffled.
inline std::vector<unsigned> block_order(unsigned blocks) {
    std::vector<unsigned> order(blocks);
    for (unsigned b = 0; b < blocks; ++b) order[b] = b;
    if (schedule().order == Order::reverse) std::reverse(order.begin(), order.end());
    if (schedule().order == Order::random) {
        for (unsigned b = blocks; b > 1; --b) std::swap(order[b - 1], order[next_random(schedule().rng) % b]);
    }
    return order;
}

// Runs every block of the launch to its end; nothing runs when a GPU would refuse the launch. CUDA's
// error for too much shared memory is "invalid argument".
inline hipError_t launch(dim3 grid, dim3 block_dim, std::size_t dynamic_bytes, const void* kernel,
                         const std::function<void()>& body) {
    const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
    if (threads == 0 || threads > kMaxBlockThreads || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        return hipErrorInvalidConfiguration;
    }
    Launch& launch = active();
    launch.statics = &static_shared_of(kernel);
    if (launch.statics->bytes + dynamic_bytes > kSharedBytesPerBlock) return hipErrorInvalidValue;
    gridDim = grid;
    blockDim = block_dim;
    launch.body = &body;
    launch.statics_owner = nullptr;
    launch.steps = 0;
    launch.stacks.resize(kResidentBlocks * kMaxBlockThreads);
    const std::vector<unsigned> order = block_order(grid.x * grid.y * grid.z);
    std::vector<std::unique_ptr<Block>> resident(kResidentBlocks);
    std::size_t started = 0;
    for (;;) {
        for (unsigned slot = 0; slot < kResidentBlocks; ++slot) {
            if (resident[slot] && resident[slot]->remaining == 0) {
                if (launch.statics_owner == resident[slot].get()) launch.statics_owner = nullptr;
                resident[slot].reset();
            }
            if (!resident[slot] && started < order.size()) {
                resident[slot] = start_block(order[started++], slot, dynamic_bytes);
            }
        }
        if (launch.runnable.empty()) break;
        Fiber* fiber = launch.runnable.top().fiber;
        launch.runnable.pop();
        launch.current = fiber;
        ++launch.steps;
        threadIdx = fiber->index;
        blockIdx = fiber->block->index;
        swap_static_shared(fiber->block);
        switch_context(launch.scheduler, fiber->context);
    }
    for (const auto& block : resident) {
        if (!block) continue;
        std::fprintf(stderr, "megaphi fiber runtime: barrier deadlock in block (%u,%u,%u): some threads wait at a "
                             "barrier the others never reach\n", block->index.x, block->index.y, block->index.z);
        std::abort();
    }
    return hipSuccess;
}

}  // namespace megaphi_fiber
