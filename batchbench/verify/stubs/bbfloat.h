// 16-bit floats for the CPU stubs: IEEE half (CUDA __half, Metal half) and bfloat16.
//
// Two bytes of storage, like the GPU types, so kernel pointers index real fp16/bf16 buffers.
// Every operation rounds to the 16-bit format (round to nearest even), as the GPU's 16-bit
// ALUs do. Mixed arithmetic follows Metal's promotions: 16-bit op 16-bit -> 16-bit,
// 16-bit op float/double -> float/double, 16-bit op integer -> 16-bit.
#pragma once
#pragma GCC system_header

#include <cstdint>
#include <type_traits>

namespace bbemu {

constexpr float bits_to_f32(uint32_t b) { return __builtin_bit_cast(float, b); }
constexpr uint32_t f32_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

constexpr float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) {
      return bits_to_f32(sign);
    }
    int shifts = 0;
    while (!(man & 0x400u)) {
      man <<= 1;
      ++shifts;
    }
    return bits_to_f32(sign | (static_cast<uint32_t>(113 - shifts) << 23) | ((man & 0x3ffu) << 13));
  }
  if (exp == 31) {
    return bits_to_f32(sign | 0x7f800000u | (man << 13));
  }
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even; overflow to inf; NaN stays NaN (quiet).
constexpr uint16_t float_to_half(float f) {
  uint32_t x = f32_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x47800000u) { // >= 65536 or inf/NaN
    if (x > 0x7f800000u) {
      return static_cast<uint16_t>(sign | 0x7e00u | ((x >> 13) & 0x3ffu));
    }
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (x < 0x38800000u) { // below the smallest normal half: align the mantissa with a float add
    const float magic = bits_to_f32(126u << 23);  // 0.5: its ulp is 2^-24, the half subnormal step
    const float r = bits_to_f32(x) + magic;      // rounds to nearest even in float hardware
    return static_cast<uint16_t>(sign | (f32_to_bits(r) - (126u << 23)));
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd; // rebias exponent (-112 << 23) and round
  return static_cast<uint16_t>(sign | (x >> 13));
}

constexpr float bf16_to_float(uint16_t b) { return bits_to_f32(static_cast<uint32_t>(b) << 16); }

constexpr uint16_t float_to_bf16(float f) {
  const uint32_t x = f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((x >> 16) | 0x40u);
  }
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

struct bits_tag {};

template <class Tag>
struct f16base;

struct half_tag {
  static constexpr float to_f(uint16_t b) { return half_to_float(b); }
  static constexpr uint16_t from_f(float f) { return float_to_half(f); }
};
struct bf16_tag {
  static constexpr float to_f(uint16_t b) { return bf16_to_float(b); }
  static constexpr uint16_t from_f(float f) { return float_to_bf16(f); }
};

template <class Tag>
struct f16base {
  uint16_t bits;
  f16base() = default;
  constexpr f16base(uint16_t b, bits_tag) : bits(b) {}
  template <class T, std::enable_if_t<std::is_arithmetic<T>::value, int> = 0>
  constexpr f16base(T v) : bits(Tag::from_f(static_cast<float>(v))) {}
  template <class Tag2, std::enable_if_t<!std::is_same<Tag, Tag2>::value, int> = 0>
  constexpr explicit f16base(f16base<Tag2> o) : bits(Tag::from_f(static_cast<float>(o))) {}
  constexpr operator float() const { return Tag::to_f(bits); }
  static constexpr f16base from_bits(uint16_t b) { return f16base(b, bits_tag{}); }

  template <class T>
  f16base& operator+=(T o) { return *this = f16base(static_cast<float>(*this) + static_cast<float>(o)); }
  template <class T>
  f16base& operator-=(T o) { return *this = f16base(static_cast<float>(*this) - static_cast<float>(o)); }
  template <class T>
  f16base& operator*=(T o) { return *this = f16base(static_cast<float>(*this) * static_cast<float>(o)); }
  template <class T>
  f16base& operator/=(T o) { return *this = f16base(static_cast<float>(*this) / static_cast<float>(o)); }
  f16base& operator++() { return *this += 1.0f; }
  f16base& operator--() { return *this -= 1.0f; }
  f16base operator++(int) { f16base t = *this; *this += 1.0f; return t; }
  f16base operator--(int) { f16base t = *this; *this -= 1.0f; return t; }
  constexpr f16base operator-() const { return from_bits(static_cast<uint16_t>(bits ^ 0x8000u)); }
  constexpr f16base operator+() const { return *this; }
};

using f16 = f16base<half_tag>;
using bf16 = f16base<bf16_tag>;

template <class T>
struct is_f16like : std::false_type {};
template <class Tag>
struct is_f16like<f16base<Tag>> : std::true_type {};

// Result type of a binary op with a 16-bit operand of type H and another of type T.
template <class H, class T, class = void>
struct mix16 {};
template <class H, class T>
struct mix16<H, T, std::enable_if_t<std::is_floating_point<T>::value>> {
  using type = T;
};
template <class H, class T>
struct mix16<H, T, std::enable_if_t<std::is_integral<T>::value>> {
  using type = H;
};

#define BBEMU_F16_OPS(OP)                                                                      \
  template <class Tag>                                                                         \
  constexpr f16base<Tag> operator OP(f16base<Tag> a, f16base<Tag> b) {                         \
    return f16base<Tag>(static_cast<float>(a) OP static_cast<float>(b));                       \
  }                                                                                            \
  template <class Tag, class T, class R = typename mix16<f16base<Tag>, T>::type>               \
  constexpr R operator OP(f16base<Tag> a, T b) {                                               \
    return R(static_cast<float>(a) OP b);                                                      \
  }                                                                                            \
  template <class Tag, class T, class R = typename mix16<f16base<Tag>, T>::type>               \
  constexpr R operator OP(T a, f16base<Tag> b) {                                               \
    return R(a OP static_cast<float>(b));                                                      \
  }                                                                                            \
  template <class TagA, class TagB, std::enable_if_t<!std::is_same<TagA, TagB>::value, int> = 0> \
  constexpr float operator OP(f16base<TagA> a, f16base<TagB> b) {                              \
    return static_cast<float>(a) OP static_cast<float>(b);                                     \
  }
BBEMU_F16_OPS(+)
BBEMU_F16_OPS(-)
BBEMU_F16_OPS(*)
BBEMU_F16_OPS(/)
#undef BBEMU_F16_OPS

#define BBEMU_F16_CMP(OP)                                                                      \
  template <class TagA, class TagB>                                                            \
  constexpr bool operator OP(f16base<TagA> a, f16base<TagB> b) {                               \
    return static_cast<float>(a) OP static_cast<float>(b);                                     \
  }                                                                                            \
  template <class Tag, class T, std::enable_if_t<std::is_arithmetic<T>::value, int> = 0>       \
  constexpr bool operator OP(f16base<Tag> a, T b) {                                            \
    return static_cast<float>(a) OP b;                                                         \
  }                                                                                            \
  template <class Tag, class T, std::enable_if_t<std::is_arithmetic<T>::value, int> = 0>       \
  constexpr bool operator OP(T a, f16base<Tag> b) {                                            \
    return a OP static_cast<float>(b);                                                         \
  }
BBEMU_F16_CMP(==)
BBEMU_F16_CMP(!=)
BBEMU_F16_CMP(<)
BBEMU_F16_CMP(<=)
BBEMU_F16_CMP(>)
BBEMU_F16_CMP(>=)
#undef BBEMU_F16_CMP

} // namespace bbemu
