#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use candle_core::cpu::exp::exp_f32s;
use candle_core::{Context, Device, Result, Storage, Tensor, WithDType};

use half::bf16;
use half::f16;
use rayon::prelude::*;

use std::{f32, iter::Sum};

// Optional hardware prefetch for ping‑pong style scheduling.
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::_mm_prefetch;

// --- portable wrapper around architecture‑specific prefetch -------------
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch(addr: *const u8) {
    _mm_prefetch(addr as *const i8, core::arch::x86_64::_MM_HINT_T0);
}

#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn prefetch(addr: *const u8) {
    core::arch::asm!(
        "prfm pldl1keep, [{0}]",
        in(reg) addr,
        options(readonly, nostack, preserves_flags)
    );
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[inline(always)]
unsafe fn prefetch(_addr: *const u8) {}
// -----------------------------------------------------------------------

use crate::attention::SdpaParams;

/// Local change (vendor/README.md): the attention kernels run in the caller's rayon pool (the
/// global one, where the forward pass runs on CPU) instead of a second pool of their own. Two
/// pools of one thread per core each, spinning in `sched_yield` while the other works, fought
/// over the same cores every layer. Only where the work runs changes, not what it computes.
struct CallerPool;

impl CallerPool {
    #[inline(always)]
    fn install<R>(&self, op: impl FnOnce() -> R) -> R {
        op()
    }
}

static FLASH_ATTN_POOL: CallerPool = CallerPool;

const DOT_CHUNK: usize = 4;

/// Size (in KV positions) processed by each inner‑tile job.
const TILE_KV: usize = 16;

/// Unrolled dot‑product that works purely in `f32`.
///
/// Local change (vendor/README.md): the same sum in the same order as 0.8.1's loop (per chunk of
/// four, the products added left to right, then added to the running sum; the tail one by one),
/// over `chunks_exact` instead of indexing: the per-element bounds checks go, and the chunk's
/// four conversions and products can run as vector instructions. Bitwise the same result.
#[inline]
fn vec_dot_f32<T: UpcastF32 + Copy>(a: &[T], b: &[T]) -> f32 {
    let mut sum = 0f32;
    let whole = a.len() / DOT_CHUNK * DOT_CHUNK;
    for (x, y) in a[..whole].chunks_exact(DOT_CHUNK).zip(b[..whole].chunks_exact(DOT_CHUNK)) {
        let (x, y): (&[T; DOT_CHUNK], &[T; DOT_CHUNK]) = (x.try_into().unwrap(), y.try_into().unwrap());
        sum += x[0].to_f32() * y[0].to_f32()
            + x[1].to_f32() * y[1].to_f32()
            + x[2].to_f32() * y[2].to_f32()
            + x[3].to_f32() * y[3].to_f32();
    }
    for i in whole..a.len() {
        sum += a[i].to_f32() * b[i].to_f32();
    }
    sum
}

/// Local change (vendor/README.md, 16): `vec_dot_f32(q, key)` for each of `N` keys at once,
/// `q` already in f32 (the conversion is exact). Each key's sum is added in exactly
/// `vec_dot_f32`'s order (per chunk of four, left to right, then to the running sum; the tail one
/// by one), so each result is bitwise `vec_dot_f32`'s; the `N` sums are independent chains the
/// core runs side by side instead of waiting on one chain's adds key after key.
#[inline]
fn vec_dot_f32_keys<T: UpcastF32 + Copy, const N: usize>(q: &[f32], keys: [&[T]; N]) -> [f32; N] {
    let d = q.len();
    let keys = keys.map(|k| &k[..d]);
    let whole = d / DOT_CHUNK * DOT_CHUNK;
    let mut sum = [0f32; N];
    for c in (0..whole).step_by(DOT_CHUNK) {
        let x: &[f32; DOT_CHUNK] = q[c..c + DOT_CHUNK].try_into().unwrap();
        for (l, key) in keys.iter().enumerate() {
            let y: &[T; DOT_CHUNK] = key[c..c + DOT_CHUNK].try_into().unwrap();
            sum[l] += x[0] * y[0].to_f32() + x[1] * y[1].to_f32() + x[2] * y[2].to_f32() + x[3] * y[3].to_f32();
        }
    }
    for i in whole..d {
        for (l, key) in keys.iter().enumerate() {
            sum[l] += q[i] * key[i].to_f32();
        }
    }
    sum
}

/// Keys scored together by [`vec_dot_f32_keys`] in the decode kernel.
const DECODE_KEYS: usize = 4;

/// Local change (vendor/README.md, 17): what the online softmax does with one key, known once
/// the keys' scores are: the key is masked out, raises the running maximum, or stays below it.
const KEY_SKIPPED: u8 = 0;
const KEY_KEPT: u8 = 1;
const KEY_RAISES: u8 = 2;
const KEY_BELOW: u8 = 3;

/// Local change (vendor/README.md, 17): the first half of 0.8.1's online softmax, over a row's
/// scores in order. Each kept key's score becomes the argument its exponential gets there —
/// `m_old - s` where the score raises the running maximum `m_old` (then `ms`), `s - m` where it
/// does not (then `vs`) — and its kind says which; masked keys get 0 (never read). Returns the
/// final maximum. The exponentials can then be taken all at once (`exp_f32s`, bitwise `exp`),
/// and [`add_weighted_values`] does the rest in the original order.
fn softmax_exponents(s_vals: &mut [f32], kinds: &mut [u8]) -> f32 {
    let mut m = f32::NEG_INFINITY;
    for (x, kind) in s_vals.iter_mut().zip(kinds.iter_mut()) {
        if *kind == KEY_SKIPPED {
            *x = 0.0;
            continue;
        }
        let s_val = *x;
        if s_val > m {
            *x = m - s_val;
            m = s_val;
            *kind = KEY_RAISES;
        } else {
            *x = s_val - m;
            *kind = KEY_BELOW;
        }
    }
    m
}

/// Local change (vendor/README.md, 17): the second half of 0.8.1's online softmax, with the
/// exponentials of [`softmax_exponents`]' arguments in `weights`: key by key, a key that raised
/// the maximum rescales the output (`vkq *= ms`) and adds its value row with weight 1, any other
/// adds its row with weight `vs`; the sum of weights follows (`s = s * ms + vs`). The same
/// operations in the same order as 0.8.1's loop. `value(i)` is key `i`'s value row (called once
/// per kept key, in order, so it may prefetch the next). Returns `s`, starting from 0.
#[inline]
fn add_weighted_values<'a, T: UpcastF32 + Copy + 'a>(
    weights: &[f32],
    kinds: &[u8],
    mut value: impl FnMut(usize) -> &'a [T],
    vkq: &mut [f32],
) -> f32 {
    let mut s = 0f32;
    for (i, (&w, &kind)) in weights.iter().zip(kinds).enumerate() {
        let (ms, vs) = match kind {
            KEY_SKIPPED => continue,
            KEY_RAISES => {
                for v in vkq.iter_mut() {
                    *v *= w;
                }
                (w, 1.0)
            }
            _ => (1.0, w),
        };
        add_scaled(vkq, value(i), vs);
        s = s * ms + vs;
    }
    s
}

/// Keys a block of [`dot_scores`] scores together: one lane per key.
const SCORE_LANES: usize = 16;

/// Local change (vendor/README.md): the keys of one (batch, KV head) transposed to
/// `[d][keys rounded up to SCORE_LANES]` in f32, so that [`dot_scores`] reads one key per lane.
/// Built once per (batch, KV head) and shared by every query row and head that reads it.
fn transpose_keys<T: UpcastF32 + Copy>(
    k_data: &[T],
    k_base: usize,
    key_stride: usize,
    kv_len: usize,
    d: usize,
) -> Vec<f32> {
    let padded = kv_len.div_ceil(SCORE_LANES) * SCORE_LANES;
    let mut kt = vec![0f32; d * padded];
    for kv_pos in 0..kv_len {
        let row = &k_data[k_base + kv_pos * key_stride..][..d];
        for (d_i, x) in row.iter().enumerate() {
            kt[d_i * padded + kv_pos] = x.to_f32();
        }
    }
    kt
}

/// Local change (vendor/README.md): `vec_dot_f32(q_row, key)` for every key of `kt` (from
/// [`transpose_keys`]) at once, into `scores`. Each lane holds one key and adds its products in
/// exactly `vec_dot_f32`'s order (per chunk of four, left to right, then to the running sum; the
/// tail one by one), with separate multiplies and adds, so every score is bitwise what
/// `vec_dot_f32` gives; the lanes are independent, so they run as vector instructions instead of
/// one dependent chain per key.
fn dot_scores<T: UpcastF32 + Copy>(q_row: &[T], kt: &[f32], scores: &mut [f32]) {
    let d = q_row.len();
    let padded = kt.len() / d.max(1);
    let q: Vec<f32> = q_row.iter().map(|x| x.to_f32()).collect();
    let whole = d / DOT_CHUNK * DOT_CHUNK;
    for (block, out) in scores.chunks_mut(SCORE_LANES).enumerate() {
        let lane0 = block * SCORE_LANES;
        let col = |d_i: usize| -> &[f32; SCORE_LANES] {
            kt[d_i * padded + lane0..][..SCORE_LANES].try_into().unwrap()
        };
        let mut sum = [0f32; SCORE_LANES];
        for c in (0..whole).step_by(DOT_CHUNK) {
            let (k0, k1, k2, k3) = (col(c), col(c + 1), col(c + 2), col(c + 3));
            for l in 0..SCORE_LANES {
                sum[l] += q[c] * k0[l] + q[c + 1] * k1[l] + q[c + 2] * k2[l] + q[c + 3] * k3[l];
            }
        }
        for d_i in whole..d {
            let k = col(d_i);
            for l in 0..SCORE_LANES {
                sum[l] += q[d_i] * k[l];
            }
        }
        out.copy_from_slice(&sum[..out.len()]);
    }
}

/// Local change (vendor/README.md, 17): 0.8.1's online softmax over a row's (or tile's) keys,
/// with their exponentials taken all at once: [`softmax_exponents`] (`scores` become the
/// exponent arguments, `kinds` what each key does), `exp_f32s` into `weights` (scratch of the
/// same length), then [`add_weighted_values`] into `vkq`. Returns the sum of weights and the
/// maximum, bitwise the loop's.
#[inline]
fn online_softmax<'a, T: UpcastF32 + Copy + 'a>(
    scores: &mut [f32],
    kinds: &mut [u8],
    weights: &mut [f32],
    value: impl FnMut(usize) -> &'a [T],
    vkq: &mut [f32],
) -> (f32, f32) {
    let m = softmax_exponents(scores, kinds);
    exp_f32s(scores, weights);
    (add_weighted_values(weights, kinds, value, vkq), m)
}

/// Local change (vendor/README.md, 16): `acc[i] += v[i] * w` for every element, as 0.8.1's
/// indexed loop over `0..dv` computed it (each element one multiply, then one add), over zipped
/// slices instead of indices: without a bounds check per element the loop runs as vector
/// instructions. Bitwise the same result: each element's two operations are unchanged.
#[inline]
fn add_scaled<T: UpcastF32 + Copy>(acc: &mut [f32], v: &[T], w: f32) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += x.to_f32() * w;
    }
}

#[inline]
fn clamp_index(idx: usize, dim: usize) -> usize {
    if dim == 0 {
        0
    } else if idx >= dim {
        dim - 1
    } else {
        idx
    }
}

#[inline]
fn mask_offset(
    dims: &[usize],
    b: usize,
    h: usize,
    b_i: usize,
    h_i: usize,
    q_pos: usize,
    kv_pos: usize,
) -> Option<usize> {
    if dims.is_empty() {
        return Some(0);
    }

    match dims.len() {
        1 => {
            let kv_dim = dims[0];
            if kv_dim == 0 {
                None
            } else {
                Some(clamp_index(kv_pos, kv_dim))
            }
        }
        2 => {
            let q_dim = dims[0];
            let kv_dim = dims[1];
            if q_dim == 0 || kv_dim == 0 {
                None
            } else {
                let q_idx = clamp_index(q_pos, q_dim);
                let kv_idx = clamp_index(kv_pos, kv_dim);
                Some(q_idx * kv_dim + kv_idx)
            }
        }
        3 => {
            let d0 = dims[0];
            let d1 = dims[1];
            let d2 = dims[2];
            if d0 == 0 || d1 == 0 || d2 == 0 {
                return None;
            }
            let q_idx = clamp_index(q_pos, d1);
            let kv_idx = clamp_index(kv_pos, d2);
            if d0 == b || d0 == 1 {
                let b_idx = if d0 == 1 { 0 } else { clamp_index(b_i, d0) };
                Some((b_idx * d1 + q_idx) * d2 + kv_idx)
            } else if d0 == h || d0 == 1 {
                let h_idx = if d0 == 1 { 0 } else { clamp_index(h_i, d0) };
                Some((h_idx * d1 + q_idx) * d2 + kv_idx)
            } else if d0 == b.saturating_mul(h) {
                let combined_idx = clamp_index(b_i * h + h_i, d0);
                Some((combined_idx * d1 + q_idx) * d2 + kv_idx)
            } else {
                Some(q_idx * d2 + kv_idx)
            }
        }
        4 => {
            let d0 = dims[0];
            let d1 = dims[1];
            let d2 = dims[2];
            let d3 = dims[3];
            if d0 == 0 || d1 == 0 || d2 == 0 || d3 == 0 {
                return None;
            }
            let b_idx = if d0 == 1 {
                0
            } else if d0 == b {
                clamp_index(b_i, d0)
            } else if d0 == b.saturating_mul(h) {
                clamp_index(b_i * h + h_i, d0)
            } else {
                clamp_index(b_i, d0)
            };
            let h_idx = if d1 == 1 {
                0
            } else if d1 == h {
                clamp_index(h_i, d1)
            } else if d1 == b {
                clamp_index(b_i, d1)
            } else {
                clamp_index(h_i, d1)
            };
            let q_idx = clamp_index(q_pos, d2);
            let kv_idx = clamp_index(kv_pos, d3);
            Some(((b_idx * d1 + h_idx) * d2 + q_idx) * d3 + kv_idx)
        }
        _ => {
            let q_dim = *dims.get(dims.len().saturating_sub(2))?;
            let kv_dim = *dims.last()?;
            if q_dim == 0 || kv_dim == 0 {
                return None;
            }
            let q_idx = clamp_index(q_pos, q_dim);
            let kv_idx = clamp_index(kv_pos, kv_dim);
            let mut prefix_dim = 1usize;
            for &dim in &dims[..dims.len() - 2] {
                if dim == 0 {
                    return None;
                }
                prefix_dim = prefix_dim.saturating_mul(dim);
            }
            let combined_idx = if prefix_dim == 0 {
                0
            } else {
                let idx_val = b_i * h + h_i;
                idx_val.min(prefix_dim - 1)
            };
            Some((combined_idx * q_dim + q_idx) * kv_dim + kv_idx)
        }
    }
}

struct MaskInfo<'a> {
    data: &'a [f32],
    dims: &'a [usize],
    b: usize,
    h: usize,
}

impl<'a> MaskInfo<'a> {
    #[inline]
    fn value(&self, b_i: usize, h_i: usize, q_pos: usize, kv_pos: usize) -> f32 {
        if let Some(idx) = mask_offset(self.dims, self.b, self.h, b_i, h_i, q_pos, kv_pos) {
            *self.data.get(idx).unwrap_or(&0.0)
        } else {
            0.0
        }
    }
}

pub(crate) trait DowncastF32 {
    fn cast(x: f32) -> Self;
}

impl DowncastF32 for f32 {
    fn cast(x: f32) -> Self {
        x
    }
}

impl DowncastF32 for f16 {
    fn cast(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl DowncastF32 for bf16 {
    fn cast(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Up‑cast helper: convert any supported element type to `f32` once so that the
/// hot kernels can run entirely in `f32` and only down‑cast when writing out.
pub trait UpcastF32 {
    fn to_f32(self) -> f32;
}

impl UpcastF32 for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl UpcastF32 for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

impl UpcastF32 for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

pub fn run_flash_attn_cpu<T>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    sdpa_params: &SdpaParams,
) -> Result<Tensor>
where
    T: WithDType + Sum + num_traits::real::Real + DowncastF32 + UpcastF32 + Copy,
{
    run_flash_attn_cpu_with::<T>(q, k, v, mask, sdpa_params, None)
}

/// Local change (vendor/README.md): a decode step (query length 1) of a batch whose KV rows are
/// valid only up to `row_lens[b]` positions: each row attends to exactly its own positions, in
/// exactly the tiles and order it does alone, so its result is bitwise the same.
pub fn run_flash_attn_cpu_rows<T>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    row_lens: &[usize],
    sdpa_params: &SdpaParams,
) -> Result<Tensor>
where
    T: WithDType + Sum + num_traits::real::Real + DowncastF32 + UpcastF32 + Copy,
{
    let (b, q_len, kv_len) = (q.dim(0)?, q.dim(1)?, k.dim(1)?);
    if q_len != 1 || row_lens.len() != b || row_lens.iter().any(|&len| len == 0 || len > kv_len) {
        candle_core::bail!("attention over rows: {b} rows of lengths {row_lens:?} (at most {kv_len}), query length {q_len}");
    }
    run_flash_attn_cpu_with::<T>(q, k, v, None, sdpa_params, Some(row_lens))
}

fn run_flash_attn_cpu_with<T>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    sdpa_params: &SdpaParams,
    row_lens: Option<&[usize]>,
) -> Result<Tensor>
where
    T: WithDType + Sum + num_traits::real::Real + DowncastF32 + UpcastF32 + Copy,
{
    // Inline CPU slice extraction for q, k, v, and optional mask
    let (q_guard, q_layout) = q.storage_and_layout();
    let q_data: &[T] = if let Storage::Cpu(cpu) = &*q_guard {
        let data = cpu.as_slice::<T>().context("Expected CPU storage for q")?;
        &data[q_layout.start_offset()..]
    } else {
        return Err(candle_core::Error::Msg("Expected CPU storage for q".into()));
    };
    let (k_guard, k_layout) = k.storage_and_layout();
    let k_data: &[T] = if let Storage::Cpu(cpu) = &*k_guard {
        let data = cpu.as_slice::<T>().context("Expected CPU storage for k")?;
        &data[k_layout.start_offset()..]
    } else {
        return Err(candle_core::Error::Msg("Expected CPU storage for k".into()));
    };
    let (v_guard, v_layout) = v.storage_and_layout();
    let v_data: &[T] = if let Storage::Cpu(cpu) = &*v_guard {
        let data = cpu.as_slice::<T>().context("Expected CPU storage for v")?;
        &data[v_layout.start_offset()..]
    } else {
        return Err(candle_core::Error::Msg("Expected CPU storage for v".into()));
    };
    let mut mask_buffer: Option<Vec<f32>> = None;
    let mut mask_dims: Option<Vec<usize>> = None;
    if let Some(mask_tensor) = mask {
        mask_dims = Some(mask_tensor.shape().dims().to_vec());
        let buffer = {
            let (guard, layout) = mask_tensor.storage_and_layout();
            if let Storage::Cpu(cpu) = &*guard {
                let data = cpu
                    .as_slice::<T>()
                    .context("Expected CPU storage for mask")?;
                data[layout.start_offset()..]
                    .iter()
                    .map(|v| (*v).to_f32())
                    .collect::<Vec<f32>>()
            } else {
                return Err(candle_core::Error::Msg(
                    "Expected CPU storage for mask".into(),
                ));
            }
        };
        mask_buffer = Some(buffer);
    }
    // q_guard, k_guard, v_guard, and m_guard (if any) are kept in scope to hold storage alive

    let q_stride = q.stride();
    let k_stride = k.stride();
    let v_stride = v.stride();

    // Fast path for decode: q_len == 1
    let mask_dims_ref = mask_dims.as_deref();
    let mask_slice = mask_buffer.as_deref();

    if q.shape().dims()[1] == 1 {
        return flash_attn_cpu_single_q(
            q_data,
            k_data,
            v_data,
            mask_slice,
            mask_dims_ref,
            q.shape().dims(),
            k.shape().dims(),
            v.shape().dims(),
            q_stride,
            k_stride,
            v_stride,
            sdpa_params.softmax_scale,
            0.0,
            sdpa_params.softcap.unwrap_or(0.0),
            row_lens,
        );
    }

    flash_attn_cpu(
        q_data,
        k_data,
        v_data,
        mask_slice,
        mask_dims_ref,
        q.shape().dims(),
        k.shape().dims(),
        v.shape().dims(),
        q_stride,
        k_stride,
        v_stride,
        sdpa_params.softmax_scale,
        0.0,
        sdpa_params.softcap.unwrap_or(0.0),
    )
}

/// Optimised path for the common decode case: q_len == 1 but kv_len ≫ 1.
/// All intermediate maths is done in `f32`; we down‑cast to `T` exactly once
/// when writing the output buffer.
#[allow(clippy::too_many_arguments)]
fn flash_attn_cpu_single_q<T>(
    q_data: &[T],
    k_data: &[T],
    v_data: &[T],
    mask_vec: Option<&[f32]>,
    mask_dims: Option<&[usize]>,
    qshape: &[usize],
    kshape: &[usize],
    vshape: &[usize],
    qstride: &[usize],
    kstride: &[usize],
    vstride: &[usize],
    scale: f32,
    max_bias: f32,
    logit_softcap: f32,
    row_lens: Option<&[usize]>,
) -> Result<Tensor>
where
    T: WithDType + Copy + UpcastF32 + DowncastF32,
{
    let (b, _q_len, h, d) = (qshape[0], qshape[1], qshape[2], qshape[3]);
    let kv_len = kshape[1];
    // Local change (vendor/README.md): how far row `b_i` of K and V is valid (all of it unless
    // the batch's rows have different lengths). A row reads the same tiles as it does alone.
    let row_len = |b_i: usize| row_lens.map_or(kv_len, |lens| lens[b_i]);
    let kv_tiles = kv_len.div_ceil(TILE_KV);
    let dv = d;

    // --- head tiling factors and softmax helper -----------------------
    let k_h = kshape[2];
    let v_h = vshape[2];
    let rk2 = h / k_h;
    let rv2 = h / v_h;
    let n2 = 2_usize.pow((h as f32).log2().ceil() as u32);

    // final output
    let mut out = vec![T::cast(0.0); b * h * dv];
    // scratch: batch × tile × heads × dv (flattened). Local change (vendor/README.md): upstream
    // 0.8.1 had no batch dimension here, so with b > 1 every sequence read the last one's tiles.
    let mut scratch = vec![0f32; b * kv_tiles * h * dv];
    let mut scratch_s = vec![0f32; b * kv_tiles * h]; // softmax S per tile
    let mut scratch_m = vec![f32::NEG_INFINITY; b * kv_tiles * h];

    // Store as plain usize so the capture is Sync (raw *mut T is not Sync)
    let scratch_ptr = scratch.as_mut_ptr() as usize;
    let scratch_s_ptr = scratch_s.as_mut_ptr() as usize;
    let scratch_m_ptr = scratch_m.as_mut_ptr() as usize;

    let mask_info = match (mask_vec, mask_dims) {
        (Some(data), Some(dims)) => Some(MaskInfo { data, dims, b, h }),
        _ => None,
    };

    FLASH_ATTN_POOL.install(|| {
        (0..kv_tiles).into_par_iter().for_each(|tile_idx| {
            let start = tile_idx * TILE_KV;

            for b_i in 0..b {
                let end = (start + TILE_KV).min(row_len(b_i));
                if start >= end {
                    continue;
                }
                for h_i in 0..h {
                    // Per‑head slope for ALiBi / NTK bias.
                    let slope = if max_bias > 0.0 {
                        2.0f32.powf(-max_bias * ((h_i + 1) as f32) / n2 as f32)
                    } else {
                        1.0
                    };
                    let k_head = h_i / rk2;
                    let v_head = h_i / rv2;

                    // pointers into scratch
                    let base_vk = (((b_i * kv_tiles + tile_idx) * h + h_i) * dv) as isize;
                    let base_s = ((b_i * kv_tiles + tile_idx) * h + h_i) as isize;

                    let q_base = b_i * qstride[0] + h_i * qstride[2];
                    let q_row = &q_data[q_base..q_base + d];

                    // Local change (vendor/README.md, 16): the tile's scores first, a few keys at
                    // a time, each bitwise `vec_dot_f32(q_row, key)`.
                    let q_f32: Vec<f32> = q_row.iter().map(|x| x.to_f32()).collect();
                    let key = |kv_pos: usize| {
                        let k_base = b_i * kstride[0] + kv_pos * kstride[1] + k_head * kstride[2];
                        &k_data[k_base..k_base + d]
                    };
                    let mut scores = [0f32; TILE_KV];
                    let mut kv_pos = start;
                    while kv_pos + DECODE_KEYS <= end {
                        let keys: [&[T]; DECODE_KEYS] = std::array::from_fn(|i| key(kv_pos + i));
                        scores[kv_pos - start..][..DECODE_KEYS].copy_from_slice(&vec_dot_f32_keys(&q_f32, keys));
                        kv_pos += DECODE_KEYS;
                    }
                    for kv_pos in kv_pos..end {
                        scores[kv_pos - start] = vec_dot_f32(q_row, key(kv_pos));
                    }

                    // Re‑materialise the pointer from the captured usize.
                    let vkq: &mut [f32] = unsafe {
                        std::slice::from_raw_parts_mut(
                            (scratch_ptr as *mut f32).add(base_vk as usize),
                            dv,
                        )
                    };
                    // Local change (vendor/README.md, 17): the tile's exponentials at once,
                    // then the online softmax's accumulation in its order.
                    let n = end - start;
                    let mut kinds = [KEY_KEPT; TILE_KV];
                    for (i, score) in scores[..n].iter_mut().enumerate() {
                        let mut s_val = *score * scale;

                        if logit_softcap != 0.0 {
                            s_val = logit_softcap * (s_val / logit_softcap).tanh();
                        }
                        let mask_delta = mask_info
                            .as_ref()
                            .map(|mask| slope * mask.value(b_i, h_i, 0, start + i))
                            .unwrap_or(0.0);
                        *score = s_val + mask_delta;
                    }
                    let value_row = |kv_pos: usize| {
                        let v_base = b_i * vstride[0] + kv_pos * vstride[1] + v_head * vstride[2];
                        &v_data[v_base..v_base + dv]
                    };
                    let (s, m) = online_softmax(
                        &mut scores[..n],
                        &mut kinds[..n],
                        &mut [0f32; TILE_KV][..n],
                        |i| {
                            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
                            if start + i + 1 < end {
                                // One‑step look‑ahead prefetch of the next V row.
                                unsafe {
                                    prefetch(value_row(start + i + 1).as_ptr() as *const u8);
                                }
                            }
                            value_row(start + i)
                        },
                        vkq,
                    );

                    unsafe {
                        *((scratch_s_ptr as *mut f32).add(base_s as usize)) = s;
                        *((scratch_m_ptr as *mut f32).add(base_s as usize)) = m;
                    }
                }
            }
        });
    });

    // -------- serial reduction over tiles (per head) --------
    for b_i in 0..b {
        for h_i in 0..h {
            let out_off = (b_i * h + h_i) * dv;

            // start with tile 0
            let first = b_i * kv_tiles * h + h_i;
            let mut vkq = vec![0f32; dv];
            vkq.copy_from_slice(&scratch[(first * dv)..(first * dv + dv)]);
            let mut s = scratch_s[first];
            let mut m = scratch_m[first];

            for tile_idx in 1..row_len(b_i).div_ceil(TILE_KV) {
                let base_s = (b_i * kv_tiles + tile_idx) * h + h_i;
                let base = base_s * dv;

                let m_b = scratch_m[base_s];
                let s_b = scratch_s[base_s];
                let vkq_b = &scratch[base..base + dv];

                if m >= m_b {
                    let factor = (m_b - m).exp();
                    for (v, v_b) in vkq.iter_mut().zip(vkq_b) {
                        *v += v_b * factor;
                    }
                    s += s_b * factor;
                } else {
                    let factor = (m - m_b).exp();
                    for (v, v_a) in vkq.iter_mut().zip(vkq_b) {
                        *v = v_a + *v * factor;
                    }
                    s = s_b + s * factor;
                    m = m_b;
                }
            }

            let inv_s = 1.0 / s;
            for (o, v) in out[out_off..][..dv].iter_mut().zip(vkq.iter()) {
                *o = T::cast(*v * inv_s);
            }
        }
    }

    Tensor::from_vec(out, (b, h, 1, dv), &Device::Cpu)
}

/// Main forward flash-attention CPU routine.
/// Shapes follow Candle convention: (B, S, H, D)
#[allow(clippy::too_many_arguments)]
fn flash_attn_cpu<T>(
    q_data: &[T],
    k_data: &[T],
    v_data: &[T],
    mask_vec: Option<&[f32]>,
    mask_dims: Option<&[usize]>,
    qshape: &[usize],
    kshape: &[usize],
    vshape: &[usize],
    qstride: &[usize],
    kstride: &[usize],
    vstride: &[usize],
    scale: f32,
    max_bias: f32,
    logit_softcap: f32,
) -> Result<Tensor>
where
    T: WithDType + Copy + UpcastF32 + DowncastF32,
{
    let (b, q_len, h, d) = (qshape[0], qshape[1], qshape[2], qshape[3]);
    let kv_len = kshape[1];
    let k_h = kshape[2];
    let v_h = vshape[2];
    let rk2 = h / k_h;
    let rv2 = h / v_h;
    let dv = d;

    let n2 = 2_usize.pow((h as f32).log2().ceil() as u32);

    let mut out = vec![T::cast(0.0); b * q_len * h * dv];

    assert_eq!(qstride[3], 1, "q must have contiguous rows");
    assert_eq!(kstride[3], 1, "k must have contiguous rows");
    assert_eq!(vstride[3], 1, "v must have contiguous rows");

    let mask_info = match (mask_vec, mask_dims) {
        (Some(data), Some(dims)) => Some(MaskInfo { data, dims, b, h }),
        _ => None,
    };

    // Local change (vendor/README.md): the keys transposed once per (batch, KV head), for
    // `dot_scores`.
    let keys_t: Vec<Vec<f32>> = FLASH_ATTN_POOL.install(|| {
        (0..b * k_h)
            .into_par_iter()
            .map(|i| transpose_keys(k_data, (i / k_h) * kstride[0] + (i % k_h) * kstride[2], kstride[1], kv_len, d))
            .collect()
    });

    FLASH_ATTN_POOL.install(|| {
        out.par_chunks_mut(dv)
            .with_min_len(64)
            .enumerate()
            .for_each(|(row_idx, out_chunk)| {
                // Decode flat index back to (batch, head, q_pos)
                let rows_per_batch = h * q_len;
                let b_i = row_idx / rows_per_batch;
                let rem = row_idx % rows_per_batch;
                let h_i = rem / q_len;
                let q_pos = rem % q_len;

                let slope = if max_bias > 0.0 {
                    2.0f32.powf(-max_bias * ((h_i + 1) as f32) / n2 as f32)
                } else {
                    1.0
                };

                let k_head = h_i / rk2;
                let v_head = h_i / rv2;

                let mut vkq = vec![0f32; dv];

                // Q row
                let q_base = b_i * qstride[0] + q_pos * qstride[1] + h_i * qstride[2];
                let q_row = &q_data[q_base..q_base + d];
                let mut scores = vec![0f32; kv_len];
                dot_scores(q_row, &keys_t[b_i * k_h + k_head], &mut scores);

                // Local change (vendor/README.md, 17): the row's scores and which keys count,
                // their exponentials at once, then the online softmax's accumulation in its order.
                let mut kinds = vec![KEY_SKIPPED; kv_len];
                for (kv_pos, (score, kind)) in scores.iter_mut().zip(kinds.iter_mut()).enumerate() {
                    // Mask (optional)
                    let mv = mask_info
                        .as_ref()
                        .map(|mask| slope * mask.value(b_i, h_i, q_pos, kv_pos))
                        .unwrap_or(0.0);
                    if mv == f32::NEG_INFINITY {
                        continue;
                    }

                    // dot(Q, K): computed above for every key (bitwise `vec_dot_f32`)
                    let mut s_val = *score;
                    let mut scale_applied = scale;
                    if logit_softcap != 0.0 {
                        scale_applied /= logit_softcap;
                    }
                    s_val *= scale_applied;
                    if logit_softcap != 0.0 {
                        s_val = logit_softcap * s_val.tanh();
                    }
                    *score = s_val + mv;
                    *kind = KEY_KEPT;
                }
                let value_row = |kv_pos: usize| {
                    let v_base = b_i * vstride[0] + kv_pos * vstride[1] + v_head * vstride[2];
                    &v_data[v_base..v_base + dv]
                };
                let (s, _) = online_softmax(
                    &mut scores,
                    &mut kinds,
                    &mut vec![0f32; kv_len],
                    |kv_pos| {
                        // -------- ping‑pong prefetch of next V row (K was read above) --------
                        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
                        if kv_pos + 1 < kv_len {
                            unsafe {
                                prefetch(value_row(kv_pos + 1).as_ptr() as *const u8);
                            }
                        }
                        value_row(kv_pos)
                    },
                    &mut vkq,
                );

                // final normalisation + downcast
                let inv_s = 1.0 / s;
                for (o, v) in out_chunk.iter_mut().zip(vkq.iter()) {
                    *o = T::cast(*v * inv_s);
                }
            });
    });

    let out_shape = (b, h, q_len, dv);
    Tensor::from_vec(out, out_shape, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::SdpaParams;
    use candle_core::{Device, Tensor, D};
    use candle_nn::ops::softmax;

    use candle_core::Result as CandleResult;

    const EPS: f32 = 1e-4;

    /// Deterministic values in [-1, 1), so a failure reproduces.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Local change (vendor/README.md): `vec_dot_f32` is bitwise 0.8.1's indexed loop, for f32
    /// and f16 rows of every length from 0 to 70 (SmolLM2's head size is 64).
    #[test]
    fn vec_dot_f32_is_bitwise_the_indexed_loop() {
        fn indexed<T: UpcastF32 + Copy>(a: &[T], b: &[T]) -> f32 {
            let mut sum = 0f32;
            let chunks = a.len() / DOT_CHUNK;
            for i in 0..chunks {
                let i_chunk = i * DOT_CHUNK;
                sum += a[i_chunk].to_f32() * b[i_chunk].to_f32()
                    + a[i_chunk + 1].to_f32() * b[i_chunk + 1].to_f32()
                    + a[i_chunk + 2].to_f32() * b[i_chunk + 2].to_f32()
                    + a[i_chunk + 3].to_f32() * b[i_chunk + 3].to_f32();
            }
            for i in (chunks * DOT_CHUNK)..a.len() {
                sum += a[i].to_f32() * b[i].to_f32();
            }
            sum
        }
        for len in 0..=70 {
            for seed in 0..8 {
                // Spread over magnitudes, so that rounding depends on the order of the additions.
                let scaled = |v: Vec<f32>| -> Vec<f32> { v.iter().enumerate().map(|(i, x)| x * 10f32.powi((i % 7) as i32 - 3)).collect() };
                let (a, b) = (scaled(values(len, 2 * seed)), scaled(values(len, 2 * seed + 1)));
                assert_eq!(vec_dot_f32(&a, &b).to_bits(), indexed(&a, &b).to_bits(), "f32, len {len}, seed {seed}");
                let (a, b): (Vec<f16>, Vec<f16>) = (a.iter().map(|&x| f16::from_f32(x)).collect(), b.iter().map(|&x| f16::from_f32(x)).collect());
                assert_eq!(vec_dot_f32(&a, &b).to_bits(), indexed(&a, &b).to_bits(), "f16, len {len}, seed {seed}");
            }
        }
    }

    /// Local change (vendor/README.md, 17): the online softmax split in two, with the
    /// exponentials taken at once in between, is bitwise 0.8.1's loop (output row, sum of
    /// weights and maximum) — f32 and f16 value rows, 0 to 70 keys, masked keys, scores that keep
    /// raising the maximum, fall below it, tie it, and underflow the exponential.
    #[test]
    fn online_softmax_in_two_passes_is_bitwise_the_loop() {
        fn check<T: UpcastF32 + Copy>(conv: impl Fn(f32) -> T, what: &str) {
            let dv = 13;
            for n in 0..=70 {
                for seed in 0..6u64 {
                    let noise = values(n, 11 * seed);
                    let s_vals: Vec<f32> = (0..n)
                        .map(|i| match seed {
                            0 => noise[i] * 8.0,
                            1 => i as f32 * 0.37 + noise[i],      // keeps raising the maximum
                            2 => -(i as f32) * 3.1 + noise[i],    // falls below it
                            3 => (noise[i] * 4.0).round(),        // ties
                            4 => noise[i] * 120.0,                // exponentials that underflow
                            _ => if i % 5 == 2 { f32::NEG_INFINITY } else { noise[i] * 2.0 },
                        })
                        .collect();
                    let masked: Vec<bool> = (0..n).map(|i| (i * 7 + seed as usize) % 4 == 0 && seed % 2 == 0).collect();
                    let v: Vec<T> = values(n * dv, 11 * seed + 1).into_iter().map(|x| conv(x * 3.0)).collect();
                    let row = |i: usize| &v[i * dv..(i + 1) * dv];

                    // 0.8.1's loop.
                    let (mut want, mut s, mut m) = (vec![0f32; dv], 0f32, f32::NEG_INFINITY);
                    for i in 0..n {
                        if masked[i] {
                            continue;
                        }
                        let s_val = s_vals[i];
                        let m_old = m;
                        let mut ms = 1.0f32;
                        let mut vs = 1.0f32;
                        if s_val > m {
                            m = s_val;
                            ms = (m_old - m).exp();
                            for x in want.iter_mut() {
                                *x *= ms;
                            }
                        } else {
                            vs = (s_val - m).exp();
                        }
                        for d_i in 0..dv {
                            want[d_i] += row(i)[d_i].to_f32() * vs;
                        }
                        s = s * ms + vs;
                    }

                    let mut args = s_vals.clone();
                    let mut kinds: Vec<u8> = masked.iter().map(|&x| if x { KEY_SKIPPED } else { KEY_KEPT }).collect();
                    let mut got = vec![0f32; dv];
                    let (got_s, got_m) = online_softmax(&mut args, &mut kinds, &mut vec![0f32; n], row, &mut got);

                    let bits = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{what}, {n} keys, seed {seed}: output");
                    assert_eq!(got_s.to_bits(), s.to_bits(), "{what}, {n} keys, seed {seed}: sum");
                    assert_eq!(got_m.to_bits(), m.to_bits(), "{what}, {n} keys, seed {seed}: maximum");
                }
            }
        }
        check(|x| x, "f32");
        check(f16::from_f32, "f16");
    }

    /// Local change (vendor/README.md, 16): the V accumulation over zipped slices is bitwise
    /// 0.8.1's indexed loop, f32 and f16 values, head sizes 0 to 70, V rows strided.
    #[test]
    fn add_scaled_is_bitwise_the_indexed_loop() {
        fn check<T: UpcastF32 + Copy>(conv: impl Fn(f32) -> T, what: &str) {
            for dv in 0..=70 {
                for seed in 0..4 {
                    let acc: Vec<f32> = values(dv, 7 * seed).iter().enumerate().map(|(i, x)| x * 10f32.powi((i % 5) as i32 - 2)).collect();
                    let v: Vec<T> = values(dv + 9, 7 * seed + 1).into_iter().map(&conv).collect();
                    let (v_base, w) = (5, values(1, 7 * seed + 2)[0] * 3.0);
                    let mut want = acc.clone();
                    for d_i in 0..dv {
                        want[d_i] += v[v_base + d_i].to_f32() * w;
                    }
                    let mut got = acc.clone();
                    add_scaled(&mut got, &v[v_base..v_base + dv], w);
                    let bits = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{what}, dv {dv}, seed {seed}");
                }
            }
        }
        check(|x| x, "f32");
        check(f16::from_f32, "f16");
    }

    /// Local change (vendor/README.md, 16): the decode kernel's scores, a few keys at a time, are
    /// bitwise `vec_dot_f32` of the query row and each key — f32 and f16, head sizes 0 to 70.
    #[test]
    fn vec_dot_f32_keys_is_bitwise_vec_dot_f32_per_key() {
        fn check<T: UpcastF32 + Copy>(conv: impl Fn(f32) -> T, what: &str) {
            for d in 0..=70 {
                for seed in 0..4 {
                    let scaled = |v: Vec<f32>| -> Vec<T> {
                        v.iter().enumerate().map(|(i, x)| conv(x * 10f32.powi((i % 7) as i32 - 3))).collect()
                    };
                    let q = scaled(values(d, 5 * seed));
                    let keys: Vec<Vec<T>> = (1..=DECODE_KEYS as u64).map(|k| scaled(values(d + 3, 5 * seed + k))).collect();
                    let q_f32: Vec<f32> = q.iter().map(|x| x.to_f32()).collect();
                    let got = vec_dot_f32_keys(&q_f32, std::array::from_fn::<_, DECODE_KEYS, _>(|i| &keys[i][..]));
                    for (i, key) in keys.iter().enumerate() {
                        let want = vec_dot_f32(&q, &key[..d]);
                        assert_eq!(got[i].to_bits(), want.to_bits(), "{what}, d {d}, seed {seed}, key {i}");
                    }
                }
            }
        }
        check(|x| x, "f32");
        check(f16::from_f32, "f16");
    }

    /// Local change (vendor/README.md): the prefill kernel's scores, all keys at once from the
    /// transposed keys, are bitwise `vec_dot_f32` of the query row and each key — f32 and f16,
    /// head sizes 1 to 70, key counts below, at and past a block of lanes, keys strided as the KV
    /// cache hands them over (other heads' rows between them).
    #[test]
    fn dot_scores_are_bitwise_vec_dot_f32_per_key() {
        fn check<T: UpcastF32 + Copy + std::fmt::Debug>(conv: impl Fn(f32) -> T, what: &str) {
            for d in 1..=70 {
                for kv_len in [1, 3, 15, 16, 17, 40] {
                    let scaled = |v: Vec<f32>| -> Vec<T> {
                        v.iter().enumerate().map(|(i, x)| conv(x * 10f32.powi((i % 7) as i32 - 3))).collect()
                    };
                    let q = scaled(values(d, d as u64));
                    // Two KV heads interleaved per position, the second one read: offset d, stride 2d.
                    let k = scaled(values(2 * d * kv_len, 7 + kv_len as u64));
                    let kt = transpose_keys(&k, d, 2 * d, kv_len, d);
                    let mut scores = vec![f32::NAN; kv_len];
                    dot_scores(&q, &kt, &mut scores);
                    for (kv_pos, score) in scores.iter().enumerate() {
                        let key = &k[d + kv_pos * 2 * d..][..d];
                        assert_eq!(score.to_bits(), vec_dot_f32(&q, key).to_bits(), "{what}, d {d}, {kv_len} keys, key {kv_pos}");
                    }
                }
            }
        }
        check(|x| x, "f32");
        check(f16::from_f32, "f16");
    }

    /// Local change (vendor/README.md): a decode step (q_len 1) over a batch gives every
    /// sequence its own attention, bitwise what it gets alone. K and V are strided as the KV
    /// cache hands them over: (b, kv_heads, capacity, d) transposed and narrowed to kv_len.
    #[test]
    fn test_flash_attn_cpu_single_q_batch_matches_each_sequence() -> CandleResult<()> {
        let (b, h, kv_h, d, capacity) = (3, 4, 2, 8, 64);
        let sdpa = SdpaParams {
            softmax_scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            n_kv_groups: h / kv_h,
            sliding_window: None,
            sinks: None,
        };
        // Spans one tile, a tile boundary, and several tiles.
        for kv_len in [5, TILE_KV + 1, 3 * TILE_KV + 7] {
            let q = Tensor::from_vec(values(b * h * d, 1), (b, h, 1, d), &Device::Cpu)?
                .transpose(1, 2)?;
            let cache = |seed| -> CandleResult<Tensor> {
                Tensor::from_vec(values(b * kv_h * capacity * d, seed), (b, kv_h, capacity, d), &Device::Cpu)?
                    .narrow(2, 0, kv_len)?
                    .transpose(1, 2)
            };
            let (k, v) = (cache(2)?, cache(3)?);
            assert!(!k.is_contiguous());
            let batched = run_flash_attn_cpu::<f32>(&q, &k, &v, None, &sdpa)?;
            assert_eq!(batched.dims(), &[b, h, 1, d]);
            for b_i in 0..b {
                let one = |t: &Tensor| t.narrow(0, b_i, 1);
                let alone = run_flash_attn_cpu::<f32>(&one(&q)?, &one(&k)?, &one(&v)?, None, &sdpa)?;
                let bits = |t: &Tensor| -> CandleResult<Vec<u32>> {
                    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
                };
                assert_eq!(
                    bits(&batched.narrow(0, b_i, 1)?)?,
                    bits(&alone)?,
                    "sequence {b_i} of {b}, kv_len {kv_len}"
                );
            }
        }
        Ok(())
    }

    /// Local change (vendor/README.md): a decode step over a batch whose rows have different
    /// lengths (right-padded, the padding NaN so that reading it would show) gives every row
    /// bitwise what its sequence gets alone — lengths within one tile, at and past a tile
    /// boundary, several tiles.
    #[test]
    fn rows_of_different_lengths_attend_as_each_sequence_alone() -> CandleResult<()> {
        let (h, kv_h, d, capacity) = (4, 2, 8, 64);
        let lens = [5, TILE_KV, TILE_KV + 1, 3 * TILE_KV + 7, 1];
        let b = lens.len();
        let sdpa = SdpaParams {
            softmax_scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            n_kv_groups: h / kv_h,
            sliding_window: None,
            sinks: None,
        };
        let longest = *lens.iter().max().unwrap();
        let q = Tensor::from_vec(values(b * h * d, 11), (b, h, 1, d), &Device::Cpu)?.transpose(1, 2)?;
        // Each row's own positions from `values`, the rest NaN; (b, kv_heads, capacity, d) as the
        // cache holds it, narrowed to the longest row and transposed as attention receives it.
        let cache = |seed| -> CandleResult<(Vec<f32>, Tensor)> {
            let mut data = values(b * kv_h * capacity * d, seed);
            for (row, &len) in lens.iter().enumerate() {
                for head in 0..kv_h {
                    let base = (row * kv_h + head) * capacity * d;
                    data[base + len * d..base + capacity * d].fill(f32::NAN);
                }
            }
            let t = Tensor::from_vec(data.clone(), (b, kv_h, capacity, d), &Device::Cpu)?
                .narrow(2, 0, longest)?
                .transpose(1, 2)?;
            Ok((data, t))
        };
        let ((k_data, k), (v_data, v)) = (cache(12)?, cache(13)?);
        let batched = run_flash_attn_cpu_rows::<f32>(&q, &k, &v, &lens, &sdpa)?;
        assert_eq!(batched.dims(), &[b, h, 1, d]);
        let bits = |t: &Tensor| -> CandleResult<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
        };
        for (row, &len) in lens.iter().enumerate() {
            // The sequence alone: its own cache, as long as it is, with a capacity of its own.
            let own = |data: &[f32]| -> CandleResult<Tensor> {
                let rows = &data[row * kv_h * capacity * d..(row + 1) * kv_h * capacity * d];
                Tensor::from_vec(rows.to_vec(), (1, kv_h, capacity, d), &Device::Cpu)?
                    .narrow(2, 0, len)?
                    .transpose(1, 2)
            };
            let alone = run_flash_attn_cpu::<f32>(&q.narrow(0, row, 1)?, &own(&k_data)?, &own(&v_data)?, None, &sdpa)?;
            let got = bits(&batched.narrow(0, row, 1)?)?;
            assert!(got.iter().all(|x| !f32::from_bits(*x).is_nan()), "row {row} read padding");
            assert_eq!(got, bits(&alone)?, "row {row}, length {len}");
        }
        Ok(())
    }

    #[test]
    fn test_flash_attn_cpu_single_q() -> CandleResult<()> {
        // Test for q_len == 1 (single Q)
        let b = 1;
        let h = 2;
        let d = 4;
        let kv_len = 2;

        // Create q with shape (b, 1, h, d) filled with ones
        let q_vec = vec![1.0f32; b * h * d];
        let q = Tensor::from_vec(q_vec.clone(), (b, 1, h, d), &Device::Cpu)?;

        // Create k and v with shape (b, kv_len, h, d) filled with ones
        let k_vec = vec![1.0f32; b * kv_len * h * d];
        let v_vec = vec![1.0f32; b * kv_len * h * d];
        let k = Tensor::from_vec(k_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;

        // SDPA parameters: scale = 1.0, no softcap
        let sdpa = SdpaParams {
            softmax_scale: 1.0,
            softcap: None,
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let scale = sdpa.softmax_scale;

        // Run the flash attention CPU function
        let out = run_flash_attn_cpu::<f32>(&q, &k, &v, None, &sdpa)?;
        // Expect output shape (b, h, 1, d)
        assert_eq!(out.shape().dims(), &[b, h, 1, d]);

        // Naive attention
        let q_perm = q.clone().permute((0, 2, 1, 3))?;
        let k_perm = k.clone().permute((0, 2, 1, 3))?;
        let v_perm = v.clone().permute((0, 2, 1, 3))?;

        let q_resh = q_perm.reshape(&[b * h, 1, d])?;
        let k_resh = k_perm.reshape(&[b * h, kv_len, d])?;
        let v_resh = v_perm.reshape(&[b * h, kv_len, d])?;

        let logits = (q_resh.matmul(&k_resh.transpose(1, 2)?)? * scale as f64)?;
        let weights = softmax(&logits, D::Minus1)?;

        let attn_out = weights.matmul(&v_resh)?;

        let naive_out = attn_out.reshape(&[b, h, 1, d])?;

        let flash_data = out.flatten_all()?.to_vec1::<f32>()?;
        let naive_data = naive_out.flatten_all()?.to_vec1::<f32>()?;
        for (f_val, n_val) in flash_data.iter().zip(naive_data.iter()) {
            assert!((f_val - n_val).abs() < EPS);
        }

        Ok(())
    }

    #[test]
    fn test_flash_attn_cpu_full_q() -> CandleResult<()> {
        // Test for q_len > 1 (full Q)
        let b = 1;
        let q_len = 2;
        let h = 2;
        let d = 4;
        let kv_len = 2;

        // Create q with shape (b, q_len, h, d) filled with ones
        let q_vec = vec![1.0f32; b * q_len * h * d];
        let q = Tensor::from_vec(q_vec.clone(), (b, q_len, h, d), &Device::Cpu)?;

        // Create k and v with shape (b, kv_len, h, d) filled with ones
        let k_vec = vec![1.0f32; b * kv_len * h * d];
        let v_vec = vec![1.0f32; b * kv_len * h * d];
        let k = Tensor::from_vec(k_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;

        // SDPA parameters: scale = 1.0, no softcap
        let sdpa = SdpaParams {
            softmax_scale: 1.0,
            softcap: None,
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let scale = sdpa.softmax_scale;

        // Run the flash attention CPU function
        let out = run_flash_attn_cpu::<f32>(&q, &k, &v, None, &sdpa)?;
        // Expect output shape (b, h, q_len, d)
        assert_eq!(out.shape().dims(), &[b, h, q_len, d]);

        // Naive attention
        let q_perm = q.clone().permute((0, 2, 1, 3))?;
        let k_perm = k.clone().permute((0, 2, 1, 3))?;
        let v_perm = v.clone().permute((0, 2, 1, 3))?;

        let q_resh = q_perm.reshape(&[b * h, q_len, d])?;
        let k_resh = k_perm.reshape(&[b * h, kv_len, d])?;
        let v_resh = v_perm.reshape(&[b * h, kv_len, d])?;

        let logits = (q_resh.matmul(&k_resh.transpose(1, 2)?)? * scale as f64)?;
        let weights = softmax(&logits, D::Minus1)?;

        let attn_out = weights.matmul(&v_resh)?;

        let naive_out = attn_out.reshape(&[b, h, q_len, d])?;

        // 7) Compare element‐by‐element
        let flash_data = out.flatten_all()?.to_vec1::<f32>()?;
        let naive_data = naive_out.flatten_all()?.to_vec1::<f32>()?;
        for (f_val, n_val) in flash_data.iter().zip(naive_data.iter()) {
            assert!((f_val - n_val).abs() < EPS);
        }

        Ok(())
    }

    #[test]
    fn test_flash_attn_cpu_single_q_softcap() -> CandleResult<()> {
        // Test for q_len == 1 (single Q) with softcap
        let b = 1;
        let h = 2;
        let d = 4;
        let kv_len = 2;

        // Create q with shape (b, 1, h, d) filled with ones
        let q_vec = vec![1.0f32; b * h * d];
        let q = Tensor::from_vec(q_vec.clone(), (b, 1, h, d), &Device::Cpu)?;

        // Create k and v with shape (b, kv_len, h, d) filled with ones
        let k_vec = vec![1.0f32; b * kv_len * h * d];
        let v_vec = vec![1.0f32; b * kv_len * h * d];
        let k = Tensor::from_vec(k_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;

        // SDPA parameters: scale = 1.0, softcap = Some(0.5)
        let sdpa = SdpaParams {
            softmax_scale: 1.0,
            softcap: Some(0.5),
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let scale = sdpa.softmax_scale;
        let sc = sdpa.softcap.unwrap();

        // Run the flash attention CPU function
        let out = run_flash_attn_cpu::<f32>(&q, &k, &v, None, &sdpa)?;
        // Expect output shape (b, h, 1, d)
        assert_eq!(out.shape().dims(), &[b, h, 1, d]);

        // Naive attention with softcap
        let q_perm = q.clone().permute((0, 2, 1, 3))?;
        let k_perm = k.clone().permute((0, 2, 1, 3))?;
        let v_perm = v.clone().permute((0, 2, 1, 3))?;

        let q_resh = q_perm.reshape(&[b * h, 1, d])?;
        let k_resh = k_perm.reshape(&[b * h, kv_len, d])?;
        let v_resh = v_perm.reshape(&[b * h, kv_len, d])?;

        let logits = (q_resh.matmul(&k_resh.transpose(1, 2)?)? * scale as f64)?;

        let logits = (logits / sc as f64)?;
        let logits = logits.tanh()?;
        let logits = (logits * sc as f64)?;

        let weights = softmax(&logits, D::Minus1)?;
        let attn_out = weights.matmul(&v_resh)?;
        let naive_out = attn_out.reshape(&[b, h, 1, d])?;

        let flash_data = out.flatten_all()?.to_vec1::<f32>()?;
        let naive_data = naive_out.flatten_all()?.to_vec1::<f32>()?;
        for (f_val, n_val) in flash_data.iter().zip(naive_data.iter()) {
            assert!((f_val - n_val).abs() < EPS);
        }
        Ok(())
    }

    #[test]
    fn test_flash_attn_cpu_full_q_softcap() -> CandleResult<()> {
        // Test for q_len > 1 (full Q) with softcap
        let b = 1;
        let q_len = 2;
        let h = 2;
        let d = 4;
        let kv_len = 2;

        // Create q with shape (b, q_len, h, d) filled with ones
        let q_vec = vec![1.0f32; b * q_len * h * d];
        let q = Tensor::from_vec(q_vec.clone(), (b, q_len, h, d), &Device::Cpu)?;

        // Create k and v with shape (b, kv_len, h, d) filled with ones
        let k_vec = vec![1.0f32; b * kv_len * h * d];
        let v_vec = vec![1.0f32; b * kv_len * h * d];
        let k = Tensor::from_vec(k_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;

        // SDPA parameters: scale = 1.0, softcap = Some(0.5)
        let sdpa = SdpaParams {
            softmax_scale: 1.0,
            softcap: Some(0.5),
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let scale = sdpa.softmax_scale;
        let sc = sdpa.softcap.unwrap();

        // Run the flash attention CPU function
        let out = run_flash_attn_cpu::<f32>(&q, &k, &v, None, &sdpa)?;
        // Expect output shape (b, h, q_len, d)
        assert_eq!(out.shape().dims(), &[b, h, q_len, d]);

        // Naive attention with softcap
        let q_perm = q.clone().permute((0, 2, 1, 3))?;
        let k_perm = k.clone().permute((0, 2, 1, 3))?;
        let v_perm = v.clone().permute((0, 2, 1, 3))?;

        let q_resh = q_perm.reshape(&[b * h, q_len, d])?;
        let k_resh = k_perm.reshape(&[b * h, kv_len, d])?;
        let v_resh = v_perm.reshape(&[b * h, kv_len, d])?;

        let logits = (q_resh.matmul(&k_resh.transpose(1, 2)?)? * scale as f64)?;

        let logits = (logits / sc as f64)?;
        let logits = logits.tanh()?;
        let logits = (logits * sc as f64)?;

        let weights = softmax(&logits, D::Minus1)?;
        let attn_out = weights.matmul(&v_resh)?;
        let naive_out = attn_out.reshape(&[b, h, q_len, d])?;

        let flash_data = out.flatten_all()?.to_vec1::<f32>()?;
        let naive_data = naive_out.flatten_all()?.to_vec1::<f32>()?;
        for (f_val, n_val) in flash_data.iter().zip(naive_data.iter()) {
            assert!((f_val - n_val).abs() < EPS);
        }
        Ok(())
    }
}
