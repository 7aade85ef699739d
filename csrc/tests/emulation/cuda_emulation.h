// CPU emulation of the CUDA subset that csrc/cuda/sinkhorn.cu uses, for the developer harness in this folder
// (run.sh). Every CUDA thread is a POSIX thread; the blocks of a launch run in waves of up to kMaxConcurrentBlocks
// blocks at a time, each block with its own barrier, warps and dynamic shared arena.
//
// What is emulated:
//   - __syncthreads: a barrier over the block's threads (mutex + condition variable, so ThreadSanitizer sees the
//     happens-before edges); each thread counts its barriers and the launch reports a block whose threads did not
//     all pass the same number (a barrier in divergent code). A barrier that never completes (some threads wait at
//     __syncthreads, others at a shuffle) is reported as a deadlock after kDeadlockSeconds.
//   - __shfl_xor_sync: every lane of the warp writes its value to a per-warp slot, warp barrier, reads the
//     partner's slot, warp barrier. The mask must be full and the warp complete (the kernels call it warp-uniformly).
//   - extern __shared__ arrays: one heap arena per block of exactly the launch's byte count, filled with 0xff bytes
//     (NaN in float and double: reads before writes show up) so that AddressSanitizer flags any access beyond it.
//   - static __shared__ declarations (rewritten by transform.py into emu::Shared / emu::SharedScalar): one copy per
//     concurrently running block, bounds-checked.
//   - the runtime calls of the launchers, with a device whose opt-in shared-memory limit is emu::device().optin_bytes
//     (sm_90: 232448) and launches that fail like CUDA's when the dynamic shared memory exceeds the kernel's
//     cudaFuncAttributeMaxDynamicSharedMemorySize (48 KiB unless raised) or the block exceeds 1024 threads.
// Launches are synchronous. Only 1-D grids and blocks.
#pragma once

#include <math.h>
#include <pthread.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct CUstream_st*;

struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  int maxDynamicSharedSizeBytes = 0;
};

namespace emu {

constexpr int kWarpSize = 32;
constexpr int kMaxConcurrentBlocks = 8;
constexpr int kDeadlockSeconds = 60;
constexpr size_t kDefaultDynamicLimit = 49152;

// The emulated device; the driver changes optin_bytes to steer the launchers' shared-memory decisions.
struct Device {
  size_t optin_bytes = 232448;        // cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
  size_t static_shared_bytes = 256;   // reported as every kernel's sharedSizeBytes
  int concurrent_blocks = 4;          // blocks per wave (<= kMaxConcurrentBlocks)
  std::map<const void*, size_t> max_dynamic;  // per kernel, cudaFuncAttributeMaxDynamicSharedMemorySize
  cudaError_t last_error = cudaSuccess;
  int launches = 0;
  int failures = 0;  // divergence / misuse reports
};

inline Device& device() {
  static Device d;
  return d;
}

inline std::mutex& report_mutex() {
  static std::mutex m;
  return m;
}

[[noreturn]] inline void fatal(const std::string& what) {
  {
    std::lock_guard<std::mutex> lock(report_mutex());
    std::fprintf(stderr, "EMULATION FATAL: %s\n", what.c_str());
    std::fflush(stderr);
  }
  std::_Exit(2);
}

inline void report(const std::string& what) {
  std::lock_guard<std::mutex> lock(report_mutex());
  std::printf("FAIL emulation: %s\n", what.c_str());
  ++device().failures;
}

// A reusable barrier for `expected` threads; a thread that exits leaves it (drop), as exited threads do on the GPU.
class Barrier {
 public:
  explicit Barrier(int expected, std::string name) : expected_(expected), name_(std::move(name)) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    const bool passed = cv_.wait_for(lock, std::chrono::seconds(kDeadlockSeconds),
                                     [&] { return generation_ != generation; });
    if (!passed) {
      fatal("deadlock at " + name_ + ": " + std::to_string(arrived_) + " of " + std::to_string(expected_) +
            " threads arrived (threads wait at different barriers or shuffles)");
    }
  }

  void drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  int expected_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::string name_;
};

struct Warp {
  Warp(int lanes_, const std::string& name) : lanes(lanes_), barrier(lanes_, name) {}
  int lanes;
  Barrier barrier;
  alignas(8) unsigned char slots[kWarpSize][8] = {};
};

struct Block {
  Block(unsigned index, unsigned threads, int slot_, size_t dynamic_bytes)
      : block_index(index), slot(slot_), barrier(static_cast<int>(threads), "__syncthreads of block " +
                                                                                   std::to_string(index)),
        syncs(threads, 0), shuffles(threads, 0) {
    for (unsigned w = 0; w * kWarpSize < threads; ++w) {
      const int lanes = static_cast<int>(std::min<unsigned>(kWarpSize, threads - w * kWarpSize));
      warps.push_back(std::make_unique<Warp>(
          lanes, "shuffle of warp " + std::to_string(w) + " of block " + std::to_string(index)));
    }
    arena = static_cast<unsigned char*>(std::malloc(dynamic_bytes));
    if (dynamic_bytes > 0 && arena == nullptr) fatal("out of memory for the shared arena");
    if (arena != nullptr) std::memset(arena, 0xff, dynamic_bytes);  // "uninitialised": NaN in float and double
  }
  ~Block() { std::free(arena); }

  unsigned block_index;
  int slot;
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* arena = nullptr;
  std::vector<uint64_t> syncs;     // __syncthreads passed, per thread
  std::vector<uint64_t> shuffles;  // shuffles done, per thread
};

inline thread_local Block* current_block = nullptr;

inline Block& block() {
  if (current_block == nullptr) fatal("device function called outside a kernel");
  return *current_block;
}

inline unsigned char* dynamic_shared() { return block().arena; }

// A static __shared__ array: one copy per concurrently running block.
template <typename T, size_t N>
struct Shared {
  T& operator[](size_t i) {
    if (i >= N) fatal("static __shared__ array index " + std::to_string(i) + " out of bounds " + std::to_string(N));
    return data[block().slot][i];
  }
  T data[kMaxConcurrentBlocks][N];
};

// A static __shared__ scalar.
template <typename T>
struct SharedScalar {
  T& ref() { return data[block().slot]; }
  operator T() { return ref(); }
  SharedScalar& operator=(const T& value) {
    ref() = value;
    return *this;
  }
  T data[kMaxConcurrentBlocks];
};

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  cudaStream_t stream = nullptr;
};

template <typename Body>
void* thread_entry(void* body) {
  (*static_cast<Body*>(body))();
  return nullptr;
}

// Runs `kernel` with CUDA's launch semantics (synchronously); sets the error cudaGetLastError returns.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
  Device& dev = device();
  ++dev.launches;
  const unsigned threads = config.block.x * config.block.y * config.block.z;
  if (config.grid.y != 1 || config.grid.z != 1 || config.block.y != 1 || config.block.z != 1) {
    fatal("the emulator supports 1-D launches only");
  }
  if (threads == 0 || threads > 1024 || config.grid.x == 0) {
    dev.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto found = dev.max_dynamic.find(reinterpret_cast<const void*>(kernel));
  size_t dynamic_limit = found != dev.max_dynamic.end() ? found->second : kDefaultDynamicLimit;
  dynamic_limit = std::min(dynamic_limit, dev.optin_bytes - dev.static_shared_bytes);
  if (config.shared_bytes > dynamic_limit) {
    dev.last_error = cudaErrorInvalidValue;  // CUDA fails such a launch ("too many resources requested")
    return;
  }
  const std::tuple<Params...> params(static_cast<Params>(std::forward<Args>(args))...);
  const unsigned blocks = config.grid.x;
  const unsigned wave = static_cast<unsigned>(std::max(1, std::min(dev.concurrent_blocks, kMaxConcurrentBlocks)));
  for (unsigned first = 0; first < blocks; first += wave) {
    const unsigned count = std::min(wave, blocks - first);
    std::vector<std::unique_ptr<Block>> running;
    for (unsigned b = 0; b < count; ++b) {
      running.push_back(std::make_unique<Block>(first + b, threads, static_cast<int>(b), config.shared_bytes));
    }
    struct ThreadBody {
      Block* blk;
      unsigned tid;
      unsigned grid;
      unsigned threads;
      const std::tuple<Params...>* params;
      void (*kernel)(Params...);
      void operator()() {
        current_block = blk;
        threadIdx = uint3{tid, 0, 0};
        blockIdx = uint3{blk->block_index, 0, 0};
        blockDim = dim3(threads);
        gridDim = dim3(grid);
        std::apply(kernel, *params);
        blk->barrier.drop();
        blk->warps[tid / kWarpSize]->barrier.drop();
        current_block = nullptr;
      }
    };
    std::vector<ThreadBody> bodies;
    bodies.reserve(static_cast<size_t>(count) * threads);
    for (auto& blk : running) {
      for (unsigned t = 0; t < threads; ++t) bodies.push_back(ThreadBody{blk.get(), t, blocks, threads, &params, kernel});
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    std::vector<pthread_t> handles(bodies.size());
    for (size_t k = 0; k < bodies.size(); ++k) {
      if (pthread_create(&handles[k], &attr, thread_entry<ThreadBody>, &bodies[k]) != 0) fatal("pthread_create");
    }
    pthread_attr_destroy(&attr);
    for (pthread_t h : handles) pthread_join(h, nullptr);
    for (auto& blk : running) {
      for (unsigned t = 1; t < threads; ++t) {
        if (blk->syncs[t] != blk->syncs[0]) {
          report("block " + std::to_string(blk->block_index) + ": thread " + std::to_string(t) + " passed " +
                 std::to_string(blk->syncs[t]) + " __syncthreads, thread 0 passed " + std::to_string(blk->syncs[0]) +
                 " (barrier in divergent code)");
          break;
        }
      }
      for (unsigned t = 0; t < threads; ++t) {
        const unsigned lead = t - t % kWarpSize;
        if (blk->shuffles[t] != blk->shuffles[lead]) {
          report("block " + std::to_string(blk->block_index) + ": lane " + std::to_string(t) + " did " +
                 std::to_string(blk->shuffles[t]) + " shuffles, lane " + std::to_string(lead) + " did " +
                 std::to_string(blk->shuffles[lead]) + " (shuffle in divergent code)");
          break;
        }
      }
    }
  }
  dev.last_error = cudaSuccess;
}

}  // namespace emu

inline void __syncthreads() {
  emu::Block& b = emu::block();
  ++b.syncs[threadIdx.x];
  b.barrier.arrive_and_wait();
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = emu::kWarpSize) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  emu::Block& b = emu::block();
  const unsigned lane = threadIdx.x % emu::kWarpSize;
  emu::Warp& warp = *b.warps[threadIdx.x / emu::kWarpSize];
  if (mask != 0xffffffffu || warp.lanes != emu::kWarpSize || width != emu::kWarpSize) {
    emu::fatal("__shfl_xor_sync needs a full mask, a full warp and width 32 in this emulator");
  }
  ++b.shuffles[threadIdx.x];
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, warp.slots[(lane ^ static_cast<unsigned>(lane_mask)) % emu::kWarpSize], sizeof(T));
  warp.barrier.arrive_and_wait();
  return result;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::device().last_error;
  emu::device().last_error = cudaSuccess;
  return e;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin || device != 0) return cudaErrorInvalidValue;
  *value = static_cast<int>(emu::device().optin_bytes);
  return cudaSuccess;
}

template <typename... Params>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, void (*kernel)(Params...)) {
  const emu::Device& dev = emu::device();
  const auto found = dev.max_dynamic.find(reinterpret_cast<const void*>(kernel));
  attributes->sharedSizeBytes = dev.static_shared_bytes;
  attributes->maxDynamicSharedSizeBytes =
      static_cast<int>(found != dev.max_dynamic.end() ? found->second : emu::kDefaultDynamicLimit);
  return cudaSuccess;
}

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  emu::Device& dev = emu::device();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > dev.optin_bytes - dev.static_shared_bytes) {
    return cudaErrorInvalidValue;
  }
  dev.max_dynamic[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
