//! 2:4 sparse GEMM: the device packing round trip on the CPU (always runs) and the GPU
//! kernels against a CPU reference (skip cleanly without a GPU or without the fatbin).

use half::f16;
use sdsparse::backend::cuda::sparse24::{
    canonical_to_dense, meta_position, prune_dense_24, Sparse24Packed, META_BLOCK_K, ROW_PAD,
};
use sdsparse::format::{sparse24_meta_row_bytes, HostData, Sparse24Weight};

/// Small deterministic generator (xorshift) so that tests need no extra crates.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

fn random_24(n: usize, k: usize, seed: u64) -> Sparse24Weight {
    let mut rng = Rng(seed);
    prune_dense_24(&rng.vec(n * k), n, k).unwrap()
}

#[test]
fn pack_decode_round_trip_matches_canonical() {
    // SD2-like, awkward (N, K not multiples of the pads) and minimum shapes.
    for &(n, k) in &[(320, 320), (64, 64), (1, 4), (16, 32), (70, 100), (1280, 5120), (8, 12), (130, 68)] {
        let w = random_24(n, k, (n * 1000 + k) as u64);
        let p = Sparse24Packed::pack(&w).unwrap();
        p.validate().unwrap();
        assert_eq!(p.n_pad % ROW_PAD, 0);
        assert_eq!(p.k_pad % META_BLOCK_K, 0);
        let dense_ref = canonical_to_dense(&w);
        let dense = p.decode_dense();
        assert_eq!(dense.len(), n * k);
        for (i, (a, b)) in dense.iter().zip(&dense_ref).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "[{n},{k}] element {i}: {a} vs {b}");
        }
    }
}

#[test]
fn every_metadata_slot_is_used_exactly_once() {
    // The (row, group) -> (word, shift) map must be a bijection onto all nibbles.
    for &(n_pad, k_pad) in &[(64usize, 64usize), (128, 192)] {
        let words = (n_pad / 16) * (k_pad / 64) * 32;
        let mut seen = vec![0u8; words * 8];
        for r in 0..n_pad {
            for g in 0..k_pad / 4 {
                let (w, s) = meta_position(r, g, k_pad);
                assert_eq!(s % 4, 0);
                seen[w * 8 + (s / 4) as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
    }
}

#[test]
fn metadata_follows_the_ptx_thread_assignment() {
    // Row 0 cols 0..16 -> lane 0 bits [15:0]; row 8 -> lane 0 bits [31:16]; row 0 cols
    // 16..32 -> lane 1; cols 32..64 (selector 1) -> lanes 2, 3; row 1 -> lane 4.
    assert_eq!(meta_position(0, 0, 64), (0, 0));
    assert_eq!(meta_position(0, 3, 64), (0, 12));
    assert_eq!(meta_position(8, 0, 64), (0, 16));
    assert_eq!(meta_position(0, 4, 64), (1, 0));
    assert_eq!(meta_position(0, 8, 64), (2, 0));
    assert_eq!(meta_position(0, 12, 64), (3, 0));
    assert_eq!(meta_position(1, 0, 64), (4, 0));
    assert_eq!(meta_position(15, 15, 64), (31, 28));
    // Next 64-column block, then next 16-row block.
    assert_eq!(meta_position(0, 16, 128), (32, 0));
    assert_eq!(meta_position(16, 0, 128), (64, 0));
}

#[test]
fn a_known_weight_packs_to_known_words() {
    // One row, 8 groups with distinct nibbles; the rest of the 64x64 block is padding.
    let nibbles: [u8; 16] = [0x4, 0x8, 0xc, 0x9, 0xd, 0xe, 0x4, 0x8, 0xc, 0x9, 0xd, 0xe, 0x4, 0x8, 0xc, 0x9];
    let mut meta = vec![0u8; sparse24_meta_row_bytes(64)];
    for (g, &nib) in nibbles.iter().enumerate() {
        meta[g / 2] |= if g % 2 == 0 { nib } else { nib << 4 };
    }
    let values = HostData::F16((0..32).map(|i| f16::from_f32(i as f32 + 1.0)).collect());
    let w = Sparse24Weight { rows: 1, cols: 64, values, meta };
    let p = Sparse24Packed::pack(&w).unwrap();
    // Lane 0: groups 0..4 of row 0 in bits [15:0], row 8 (padding, 0x4 each) in [31:16].
    assert_eq!(p.meta[0], 0x4444_0000 | 0x9c84);
    // Lane 1: groups 4..8 of row 0.
    assert_eq!(p.meta[1], 0x4444_0000 | 0x84ed);
    // Lane 2 (selector 1, columns 32..48): groups 8..12.
    assert_eq!(p.meta[2], 0x4444_0000 | 0xed9c);
    assert_eq!(p.meta[3], 0x4444_0000 | 0x9c84);
    // Values keep the canonical order, row 0 first.
    assert_eq!(p.values[0].to_f32(), 1.0);
    assert_eq!(p.values[31].to_f32(), 32.0);
    assert_eq!(p.values[32].to_f32(), 0.0);
}

#[test]
fn bad_canonical_weights_are_rejected() {
    let mut w = random_24(16, 64, 7);
    w.meta[3] = 0x55; // idx0 == idx1
    assert!(Sparse24Packed::pack(&w).is_err());
    let mut w = random_24(16, 64, 7);
    w.meta[0] = (w.meta[0] & 0xf0) | 0b0001; // idx0 = 1 > idx1 = 0: not ordered
    assert!(Sparse24Packed::pack(&w).is_err());
    let mut w = random_24(16, 64, 7);
    w.cols = 66;
    assert!(Sparse24Packed::pack(&w).is_err());
    let mut w = random_24(16, 64, 7);
    w.meta.pop();
    assert!(Sparse24Packed::pack(&w).is_err());
}
