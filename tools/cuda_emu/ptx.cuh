// kernels/ptx.cuh for the CPU emulator: the same names in plain C++ (build.sh puts this file in its place).
//
// Half conversions are exact IEEE binary16 round-to-nearest-even, as cvt.rn.f16.f32. A tensor-core fragment
// holds its whole 16×16 tile in every lane (which element a lane holds is the hardware's business, and the
// kernels never look). The wmma instructions are warp-collective (`.sync.aligned`): each starts with a warp
// barrier, and one lane does the load, product or store for the warp.
#pragma once
#include <vector>

typedef unsigned short f16;
typedef unsigned short bf16;

#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::dynamic_smem)

inline unsigned dynamic_smem_size() { return emu::dynamic_smem_bytes; }

inline float f16_bits_to_f32(unsigned h) {
    const unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));  // inf, NaN (payload kept)
    if (exp != 0) return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
    // Zero or subnormal: man · 2^-24, exact in fp32.
    const float magnitude = (float)man * 5.9604644775390625e-8f;
    return __uint_as_float(sign | __float_as_uint(magnitude));
}

// Every half widened once: kernels widen halves in their inner loops.
inline const std::vector<float> f16_table = [] {
    std::vector<float> table(65536);
    for (unsigned h = 0; h < 65536; ++h) table[h] = f16_bits_to_f32(h);
    return table;
}();

inline float f16_to_f32(f16 h) { return f16_table[h]; }

inline f16 f32_to_f16(float f) {
    const unsigned bits = __float_as_uint(f), sign = (bits >> 16) & 0x8000u;
    const unsigned abs = bits & 0x7fffffffu;
    if (abs > 0x7f800000u) return (f16)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN stays NaN
    if (abs >= 0x477ff000u) return (f16)(sign | 0x7c00u);  // rounds past 65504: inf
    if (abs < 0x38800000u) {
        // Subnormal or zero in binary16: round abs / 2^-24 to an integer, ties to even.
        const float scaled = __uint_as_float(abs) * 16777216.0f;
        return (f16)(sign | (unsigned)std::nearbyint(scaled));
    }
    // Normal: drop 13 mantissa bits with round to nearest even (a carry may bump the exponent, correctly).
    const unsigned rebased = abs - (112u << 23);
    const unsigned rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
    return (f16)(sign | (rounded >> 13));
}

struct FragA { float x[16][16]; };  // [row][k]
struct FragB { float x[16][16]; };  // [k][col]
struct FragC { float x[16][16]; };  // [row][col]

inline void zero_c(FragC& c) { memset(c.x, 0, sizeof c.x); }

// Element-wise, so each lane updates its own copy of the tile.
inline void axpy_c(FragC& c, float a, const FragC& x) {
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) c.x[i][j] = std::fma(a, x.x[i][j], c.x[i][j]);
}

// The warp's lanes all get what one lane (the first after the barrier) reads or computes: the
// instructions take one address for the whole warp.
template <class Frag, class Fill>
EMU_INLINE void warp_collective(Frag& out, Fill fill, emu::Site site) {
    emu::warp_barrier(site);
    Frag* shared = static_cast<Frag*>(emu::warp_scratch(sizeof(Frag)));
    if (emu::warp_leader()) fill(*shared);
    out = *shared;
}

// Element (r, c) of a 16 × 16 fp16 tile at p[r·row_step + c·col_step], widened.
inline void widen_tile(float (&x)[16][16], const f16* p, int row_step, int col_step) {
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) x[r][c] = f16_to_f32(p[r * row_step + c * col_step]);
}

EMU_INLINE void load_a_row(FragA& a, const f16* p, int ld, EMU_HERE) {
    warp_collective(a, [&](FragA& f) { widen_tile(f.x, p, ld, 1); }, site);
}

// B column-major: element (k, j) at p[j·ld + k].
EMU_INLINE void load_b_col(FragB& b, const f16* p, int ld, EMU_HERE) {
    warp_collective(b, [&](FragB& f) { widen_tile(f.x, p, 1, ld); }, site);
}

EMU_INLINE void load_b_row(FragB& b, const f16* p, int ld, EMU_HERE) {
    warp_collective(b, [&](FragB& f) { widen_tile(f.x, p, ld, 1); }, site);
}

EMU_INLINE void load_c_row(FragC& c, const float* p, int ld, EMU_HERE) {
    warp_collective(c, [&](FragC& f) {
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) f.x[i][j] = p[i * ld + j];
    }, site);
}

EMU_INLINE void store_d_row(float* p, const FragC& d, int ld, EMU_HERE) {
    emu::warp_barrier(site);
    if (!emu::warp_leader()) return;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) p[i * ld + j] = d.x[i][j];
}

// Products of halves are exact in fp32; the sum runs in k order.
EMU_INLINE void mma(FragC& c, const FragA& a, const FragB& b, EMU_HERE) {
    warp_collective(c, [&](FragC& f) {
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                float s = c.x[i][j];
                for (int k = 0; k < 16; ++k) s = std::fma(a.x[i][k], b.x[k][j], s);
                f.x[i][j] = s;
            }
    }, site);
}
EMU_INLINE void mma_row_col(FragC& c, const FragA& a, const FragB& b, EMU_HERE) { mma(c, a, b, site); }
EMU_INLINE void mma_row_row(FragC& c, const FragA& a, const FragB& b, EMU_HERE) { mma(c, a, b, site); }
