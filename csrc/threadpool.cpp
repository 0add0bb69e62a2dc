// A small fork-join thread pool (not OpenMP: torch's wheel ships its own libgomp, and two
// OpenMP runtimes in one process oversubscribe the cores).
//
// parallel_for hands out task indices through one atomic counter; the calling thread works
// too, and returns as soon as every task is done (a worker that never got the CPU is not waited for). Workers spin briefly after a job (decode issues many short kernels back to back),
// then sleep on a condition variable so an idle pool costs nothing.
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "common.h"

namespace {

struct Pool {
    std::vector<std::thread> workers;
    std::mutex mutex;
    std::condition_variable wake;
    // the current job; written by the caller only while no worker can be inside it (see run)
    task_fn fn = nullptr;
    void* ctx = nullptr;
    int64_t n = 0;
    std::atomic<int64_t> next{0};       // next task index to hand out
    std::atomic<int64_t> done{0};       // tasks finished
    std::atomic<int> active{0};         // workers inside the current job
    // odd: a job is open; even: closed. A worker joins a job only while it is still open, so a
    // worker the OS has not scheduled yet never holds up the caller (the machine may be loaded)
    std::atomic<uint64_t> generation{0};
    bool stop = false;
    int threads = 0;                    // including the caller

    void run_tasks(int thread) {
        for (;;) {
            int64_t t = next.fetch_add(1);
            if (t >= n) break;
            fn(ctx, t, thread);
            done.fetch_add(1);
        }
    }

    void worker(int thread) {
        uint64_t seen = generation.load();
        for (;;) {
            // spin ~50 us for the next job before sleeping
            for (int i = 0; i < 20000 && generation.load(std::memory_order_relaxed) == seen; ++i) {
#if defined(__x86_64__)
                __builtin_ia32_pause();
#endif
            }
            if (generation.load() == seen) {
                std::unique_lock<std::mutex> lock(mutex);
                wake.wait(lock, [&] { return stop || generation.load() != seen; });
                if (stop) return;
            }
            uint64_t g = generation.load();
            seen = g;
            if ((g & 1) == 0) continue;
            active.fetch_add(1);
            if (generation.load() == g) run_tasks(thread);
            active.fetch_sub(1);
        }
    }

    void start(int count) {
        shutdown();
        threads = count < 1 ? 1 : count;
        stop = false;
        for (int t = 1; t < threads; ++t) workers.emplace_back([this, t] { worker(t); });
    }

    void shutdown() {
        {
            std::lock_guard<std::mutex> lock(mutex);
            stop = true;
        }
        wake.notify_all();
        for (auto& w : workers) w.join();
        workers.clear();
    }

    void run(int64_t count, task_fn f, void* c) {
        if (threads <= 1 || count <= 1) {
            for (int64_t t = 0; t < count; ++t) f(c, t, 0);
            return;
        }
        fn = f;
        ctx = c;
        n = count;
        next.store(0);
        done.store(0);
        {
            std::lock_guard<std::mutex> lock(mutex);
            generation.fetch_add(1);  // open
        }
        wake.notify_all();
        run_tasks(0);
        while (done.load() != count) pause();
        generation.fetch_add(1);  // close: no worker joins from now on
        while (active.load() != 0) pause();
    }

    static void pause() {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }

    ~Pool() { shutdown(); }
};

Pool& pool() {
    static Pool p;
    return p;
}

std::mutex config_mutex;
bool started = false;

struct Scratch {
    float* data = nullptr;
    size_t size = 0;
};
const int SCRATCH_SLOTS = 8;
std::vector<Scratch> scratch_buffers;  // [thread][slot]

void size_scratch() {
    size_t rows = (size_t)pool().threads * SCRATCH_SLOTS;
    if (scratch_buffers.size() < rows) scratch_buffers.resize(rows);
}

void ensure_started() {
    if (!started) {
        pool().start(default_threads());
        size_scratch();
        started = true;
    }
}

}  // namespace

int default_threads() {
    const char* env = std::getenv("PORTINFER_NUM_THREADS");
    if (env && std::atoi(env) > 0) return std::atoi(env);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

void pool_set_threads(int n) {
    std::lock_guard<std::mutex> lock(config_mutex);
    pool().start(n);
    size_scratch();
    started = true;
}

int pool_threads() {
    std::lock_guard<std::mutex> lock(config_mutex);
    ensure_started();
    return pool().threads;
}

void parallel_for(int64_t n, task_fn fn, void* ctx) {
    // callers hold the kernel lock (bindings.cpp), so one job runs at a time
    ensure_started();
    pool().run(n, fn, ctx);
}

float* scratch(int thread, int slot, size_t floats) {
    // the table is sized when the pool starts; each thread only touches its own row
    ensure_started();
    Scratch& s = scratch_buffers[(size_t)thread * SCRATCH_SLOTS + slot];
    if (s.size < floats) {
        std::free(s.data);
        size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
        s.data = (float*)std::aligned_alloc(64, bytes);
        s.size = s.data ? floats : 0;
        // the large buffers are taken before any task runs, so this reaches Python as MemoryError
        if (!s.data) throw std::bad_alloc();
    }
    return s.data;
}
