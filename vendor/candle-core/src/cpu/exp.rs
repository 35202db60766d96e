//! Local change (vendor/README.md, candle-core 9): `exp` of many f32 values at once, bitwise
//! what `f32::exp` gives on x86-64 Linux with glibc.
//!
//! glibc (2.27 and later) computes `expf` in double precision from a 32-entry table and a cubic
//! polynomial (`sysdeps/ieee754/flt-32/e_expf.c`, from Arm's optimized-routines); on a CPU with
//! FMA it runs `__expf_fma`, the same source compiled with the multiplies and adds contracted.
//! [`exp_f32s`] runs exactly those operations — the same constants, each fused multiply-add where
//! `__expf_fma` has one (read from its disassembly), the same final rounding to f32 — four lanes
//! of doubles at a time, and hands the inputs glibc treats apart (|x| ≥ 88, infinities, NaN) to
//! `f32::exp` itself. So every result is bitwise `f32::exp`'s, only not one call per value.
//! Built only where that holds (x86-64 with AVX2 and FMA, Linux, glibc); elsewhere it is
//! `f32::exp` per value. `tests::exp_f32s_is_bitwise_f32_exp` checks it against the C library it
//! runs with, on all 2^32 inputs.

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::arch::x86_64::*;

    /// Inputs whose exponent field (the top 12 bits below the sign) is at least this go to
    /// `f32::exp`: |x| ≥ 88, infinities and NaN (glibc's `top12 (88.0f)`).
    const SPECIAL_TOP12: i32 = 0x42b;

    /// `__exp2f_data.tab`: `asuint64(2^(i/32)) - (i << 47)`.
    static TAB: [u64; 32] = [
        0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
        0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
        0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
        0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
        0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
        0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
        0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
    ];
    /// `invln2_scaled`: 0x1.71547652b82fep+0 * 32.
    const INV_LN2_N: u64 = 0x40471547652b82fe;
    /// `shift`: 0x1.8p+52.
    const SHIFT: u64 = 0x4338000000000000;
    /// `poly_scaled`: 0x1.c6af84b912394p-5/32^3, 0x1.ebfce50fac4f3p-3/32^2, 0x1.62e42ff0c52d6p-1/32.
    const C0: u64 = 0x3ebc6af84b912394;
    const C1: u64 = 0x3f2ebfce50fac4f3;
    const C2: u64 = 0x3f962e42ff0c52d6;

    /// `__expf_fma`'s main path on four doubles (inputs converted from f32, exactly):
    /// `kd = fma(InvLn2N, x, Shift)`, `ki = bits(kd)`, `kd -= Shift`, `r = fma(InvLn2N, x, -kd)`,
    /// `s = double(T[ki % 32] + (ki << 47))`, `y = fma(fma(r, C0, C1), r*r, fma(r, C2, 1)) * s`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp4(xd: __m256d) -> __m256d {
        let inv = _mm256_set1_pd(f64::from_bits(INV_LN2_N));
        let shift = _mm256_set1_pd(f64::from_bits(SHIFT));
        let kd = _mm256_fmadd_pd(inv, xd, shift);
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, shift);
        let r = _mm256_fmsub_pd(inv, xd, kd);
        let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        let t = _mm256_i64gather_epi64::<8>(TAB.as_ptr() as *const i64, idx);
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
        let z = _mm256_fmadd_pd(r, _mm256_set1_pd(f64::from_bits(C0)), _mm256_set1_pd(f64::from_bits(C1)));
        let r2 = _mm256_mul_pd(r, r);
        let y = _mm256_fmadd_pd(r, _mm256_set1_pd(f64::from_bits(C2)), _mm256_set1_pd(1.0));
        let y = _mm256_fmadd_pd(z, r2, y);
        _mm256_mul_pd(y, s)
    }

    /// Eight values: the main path on all of them, then `f32::exp` for those glibc treats apart.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp8(xs: &[f32; 8], ys: &mut [f32; 8]) {
        let x = _mm256_loadu_ps(xs.as_ptr());
        let lo = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        let hi = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
        let y = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
        _mm256_storeu_ps(ys.as_mut_ptr(), y);
        let top = _mm256_and_si256(_mm256_srli_epi32::<20>(_mm256_castps_si256(x)), _mm256_set1_epi32(0x7ff));
        let special = _mm256_cmpgt_epi32(top, _mm256_set1_epi32(SPECIAL_TOP12 - 1));
        let mask = _mm256_movemask_ps(_mm256_castsi256_ps(special));
        if mask != 0 {
            for (l, (x, y)) in xs.iter().zip(ys.iter_mut()).enumerate() {
                if mask & (1 << l) != 0 {
                    *y = x.exp();
                }
            }
        }
    }
}

/// `ys[i] = xs[i].exp()` for every `i`, bitwise; eight values at a time where the build allows
/// (see the module's documentation).
pub fn exp_f32s(xs: &[f32], ys: &mut [f32]) {
    assert_eq!(xs.len(), ys.len(), "exp_f32s: {} inputs, {} outputs", xs.len(), ys.len());
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_os = "linux", target_env = "gnu"))]
    let done = {
        let whole = xs.len() / 8 * 8;
        for (x, y) in xs[..whole].chunks_exact(8).zip(ys[..whole].chunks_exact_mut(8)) {
            // SAFETY: the build enables AVX2 and FMA (the `cfg` above).
            unsafe { glibc::exp8(x.try_into().unwrap(), y.try_into().unwrap()) };
        }
        whole
    };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_os = "linux", target_env = "gnu")))]
    let done = 0;
    for (x, y) in xs[done..].iter().zip(ys[done..].iter_mut()) {
        *y = x.exp();
    }
}

/// `ys[i] = xs[i] / (1.0 + (-xs[i]).exp())` for every `i` (SiLU, as `op::Silu::f32` computes
/// it), with the exponentials from [`exp_f32s`]: bitwise the same.
pub fn silu_f32s(xs: &[f32], ys: &mut [f32]) {
    assert_eq!(xs.len(), ys.len(), "silu_f32s: {} inputs, {} outputs", xs.len(), ys.len());
    const BLOCK: usize = 256;
    let mut neg = [0f32; BLOCK];
    for (x, y) in xs.chunks(BLOCK).zip(ys.chunks_mut(BLOCK)) {
        let neg = &mut neg[..x.len()];
        for (n, v) in neg.iter_mut().zip(x) {
            *n = -v;
        }
        exp_f32s(neg, y);
        for (y, v) in y.iter_mut().zip(x) {
            *y = v / (1.0 + *y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Every input in `[lo, hi)` of the f32 bit patterns, in blocks of a few thousand at odd
    /// offsets so that each lane position sees every kind of value.
    fn check_bits(lo: u64, hi: u64, step: u64) {
        const BLOCK: u64 = 4099;
        let blocks = (hi - lo).div_ceil(BLOCK * step);
        (0..blocks).into_par_iter().for_each(|b| {
            let start = lo + b * BLOCK * step;
            let xs: Vec<f32> = (0..BLOCK)
                .map(|i| start + i * step)
                .filter(|&bits| bits < hi)
                .map(|bits| f32::from_bits(bits as u32))
                .collect();
            let mut ys = vec![0f32; xs.len()];
            exp_f32s(&xs, &mut ys);
            let mut silu = vec![0f32; xs.len()];
            silu_f32s(&xs, &mut silu);
            for ((x, y), s) in xs.iter().zip(&ys).zip(&silu) {
                assert_eq!(y.to_bits(), x.exp().to_bits(), "exp({x:e}) (bits {:#010x})", x.to_bits());
                let want = x / (1.0 + (-x).exp());
                assert_eq!(s.to_bits(), want.to_bits(), "silu({x:e}) (bits {:#010x})", x.to_bits());
            }
        });
    }

    /// All 2^32 inputs (both signs, subnormals, infinities and NaNs), about 40 s on two cores. A
    /// dense sample is not enough: with `r` computed by a multiply and a subtraction instead of
    /// `__expf_fma`'s fused one, one input in 61 and every seventh between -104 and 89 still
    /// agreed (checked); all of them do not.
    #[test]
    fn exp_f32s_is_bitwise_f32_exp() {
        check_bits(0, 1 << 32, 1);
    }
}
