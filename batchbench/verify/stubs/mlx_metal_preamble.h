// Stands in for what MLX puts in front of every custom Metal kernel (metal::utils(), from
// mlx/backend/metal/kernels/utils.h): <metal_stdlib>, `using namespace metal`, the
// float16_t / bfloat16_t names and Limits<T>. Kernels should rely on nothing else of MLX's.
#pragma once
#pragma GCC system_header

#include <metal_stdlib>

using namespace metal;

typedef half float16_t;
typedef bfloat bfloat16_t;

template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};
template <>
struct Limits<float> {
  static constexpr float max = metal::numeric_limits<float>::infinity();
  static constexpr float min = -metal::numeric_limits<float>::infinity();
  static constexpr float finite_max = metal::numeric_limits<float>::max();
  static constexpr float finite_min = metal::numeric_limits<float>::lowest();
};
template <>
struct Limits<half> {
  static constexpr half max = metal::numeric_limits<half>::infinity();
  static constexpr half min = -metal::numeric_limits<half>::infinity();
  static constexpr half finite_max = metal::numeric_limits<half>::max();
  static constexpr half finite_min = metal::numeric_limits<half>::lowest();
};
template <>
struct Limits<bfloat> {
  static constexpr bfloat max = metal::numeric_limits<bfloat>::infinity();
  static constexpr bfloat min = -metal::numeric_limits<bfloat>::infinity();
  static constexpr bfloat finite_max = metal::numeric_limits<bfloat>::max();
  static constexpr bfloat finite_min = metal::numeric_limits<bfloat>::lowest();
};
