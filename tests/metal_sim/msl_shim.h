// MSL-on-CPU shim: runs a Metal compute kernel, as MLX generates it, on the CPU with g++.
//
// Semantics kept from Metal:
//   - one OS thread per GPU thread, all threads of a threadgroup alive at once;
//   - threadgroup_barrier is a real barrier over the threadgroup;
//   - simd_sum / simd_max / simd_min / simd_shuffle / simd_broadcast exchange values among the
//     (up to) 32 lanes of a simdgroup through per-simdgroup slots and barriers;
//   - `threadgroup` variables are shared by the threads of a group (threadgroups run one after
//     another, so a function-scope `static` is exactly that);
//   - partial edge threadgroups are dispatched the way MLX's dispatchThreads does.
// Not kept: performance, Metal-only compile errors, threadgroup memory limits (tests check those
// separately), and the device's exact exp/fma rounding.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace mslsim {
struct uint3_ {
  uint32_t x, y, z;
};
struct Lane {
  std::barrier<>* group_barrier;
  std::barrier<>* simd_barrier;
  float* simd_slots;  // 32 floats shared by this simdgroup
  uint32_t lane, width;
};
inline thread_local Lane self;

template <class Kernel>
void run_grid(uint3_ grid, uint3_ group, Kernel&& kernel) {
  // MLX clamps the threadgroup to the grid; edge groups are partial (dispatchThreads).
  group = {std::min(group.x, grid.x), std::min(group.y, grid.y), std::min(group.z, grid.z)};
  const uint3_ groups = {(grid.x + group.x - 1) / group.x, (grid.y + group.y - 1) / group.y,
                         (grid.z + group.z - 1) / group.z};
  for (uint32_t gz = 0; gz < groups.z; gz++)
    for (uint32_t gy = 0; gy < groups.y; gy++)
      for (uint32_t gx = 0; gx < groups.x; gx++) {
        const uint3_ size = {std::min(group.x, grid.x - gx * group.x),
                             std::min(group.y, grid.y - gy * group.y),
                             std::min(group.z, grid.z - gz * group.z)};
        const uint32_t n = size.x * size.y * size.z, simdgroups = (n + 31) / 32;
        std::barrier<> group_barrier(n);
        std::vector<std::unique_ptr<std::barrier<>>> simd_barriers;
        for (uint32_t s = 0; s < simdgroups; s++)
          simd_barriers.emplace_back(new std::barrier<>(std::min<uint32_t>(32, n - s * 32)));
        std::vector<float> slots(simdgroups * 32);
        std::vector<std::thread> threads;
        for (uint32_t i = 0; i < n; i++) {
          threads.emplace_back([&, i] {
            const uint32_t s = i / 32;
            self = Lane{&group_barrier, simd_barriers[s].get(), &slots[s * 32], i % 32,
                        std::min<uint32_t>(32, n - s * 32)};
            const uint3_ local = {i % size.x, (i / size.x) % size.y, i / (size.x * size.y)};
            kernel(local, uint3_{gx, gy, gz}, groups, size, group, i, s, simdgroups);
          });
        }
        for (auto& t : threads) t.join();
      }
}
}  // namespace mslsim

// ---- the MSL vocabulary the kernels use ----------------------------------------------------
using uint = uint32_t;
using ushort = uint16_t;
using uchar = uint8_t;
using uint3 = mslsim::uint3_;
using half = _Float16;
using float16_t = _Float16;
// bf16 as Metal's bfloat behaves: the upper half of a float32; a float becomes bf16 by rounding
// to nearest, ties to even (NaN stays NaN), and arithmetic on bf16 values rounds its result to
// bf16 again, so a kernel that computed in bf16 where it should not is caught by the tolerance.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // a quiet NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
};
inline bfloat16_t operator+(bfloat16_t a, bfloat16_t b) { return bfloat16_t(float(a) + float(b)); }
inline bfloat16_t operator-(bfloat16_t a, bfloat16_t b) { return bfloat16_t(float(a) - float(b)); }
inline bfloat16_t operator*(bfloat16_t a, bfloat16_t b) { return bfloat16_t(float(a) * float(b)); }
inline bfloat16_t operator/(bfloat16_t a, bfloat16_t b) { return bfloat16_t(float(a) / float(b)); }
// Mixed with float, bf16 promotes to float (as in Metal): no rounding.
inline float operator+(bfloat16_t a, float b) { return float(a) + b; }
inline float operator+(float a, bfloat16_t b) { return a + float(b); }
inline float operator-(bfloat16_t a, float b) { return float(a) - b; }
inline float operator-(float a, bfloat16_t b) { return a - float(b); }
inline float operator*(bfloat16_t a, float b) { return float(a) * b; }
inline float operator*(float a, bfloat16_t b) { return a * float(b); }
inline float operator/(bfloat16_t a, float b) { return float(a) / b; }
inline float operator/(float a, bfloat16_t b) { return a / float(b); }
namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
using std::clamp;
using std::exp;
using std::max;
using std::min;
inline float max(float a, float b) { return std::max(a, b); }
inline float min(float a, float b) { return std::min(a, b); }
inline int clamp(int x, int lo, int hi) { return std::clamp(x, lo, hi); }
namespace fast {
inline float exp(float x) { return std::exp(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float tanh(float x) { return std::tanh(x); }
}  // namespace precise

inline void threadgroup_barrier(mem_flags) { mslsim::self.group_barrier->arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) { mslsim::self.simd_barrier->arrive_and_wait(); }

// Every lane publishes its value, then every lane reads what it needs; the second barrier keeps
// a fast lane from overwriting a slot before the slow ones have read it.
template <class Read>
inline float simd_exchange(float value, Read read) {
  auto& me = mslsim::self;
  me.simd_slots[me.lane] = value;
  me.simd_barrier->arrive_and_wait();
  const float result = read(me.simd_slots, me.width, me.lane);
  me.simd_barrier->arrive_and_wait();
  return result;
}
inline float simd_sum(float v) {
  return simd_exchange(v, [](const float* s, uint32_t n, uint32_t) {
    float r = 0.0f;
    for (uint32_t i = 0; i < n; i++) r += s[i];
    return r;
  });
}
inline float simd_max(float v) {
  return simd_exchange(v, [](const float* s, uint32_t n, uint32_t) {
    return *std::max_element(s, s + n);
  });
}
inline float simd_min(float v) {
  return simd_exchange(v, [](const float* s, uint32_t n, uint32_t) {
    return *std::min_element(s, s + n);
  });
}
inline float simd_shuffle(float v, ushort from) {
  return simd_exchange(v, [from](const float* s, uint32_t, uint32_t) { return s[from]; });
}
inline float simd_shuffle_xor(float v, ushort mask) {
  return simd_exchange(v, [mask](const float* s, uint32_t, uint32_t lane) { return s[lane ^ mask]; });
}
inline float simd_broadcast(float v, ushort from) { return simd_shuffle(v, from); }
}  // namespace metal
using namespace metal;

// Address spaces: device/constant/thread memory is ordinary memory on the CPU. `threadgroup`
// must be shared by a group's threads: `static` (valid for kernel-scope declarations only).
#define device
#define constant
#define thread
#define threadgroup static
