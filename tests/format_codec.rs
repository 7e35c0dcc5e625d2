//! The canonical sparse layouts: encode → decode is bit-exact for every dtype (NaN and -0.0
//! included), bad parts are rejected, and a compressed weight written to a file and read
//! back through `ComponentStore` is identical to the one encoded. Also the radix cut that
//! prunes exactly `k` elements with index tie-break, and name globs.

mod format_util;

use sdsparse::checkpoint::ComponentStore;
use sdsparse::format::codec::{
    crc32_hex, LayerRecord, PatternName, SparseHeader, BITMAP_MASK, BITMAP_VALUES, S24_META, S24_VALUES,
};
use sdsparse::format::writer::{Entry, StreamWriter};
use sdsparse::format::{bitmap_row_bytes, BitmapWeight, DType, HostData, Sparse24Weight, Weight};
use sdsparse::prune::{self, Glob};
use std::collections::BTreeMap;

/// A small deterministic generator (xorshift) so the tests need no extra crates.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn random_data(rng: &mut Rng, n: usize, dtype: DType) -> HostData {
    let mut v: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    v[0] = -0.0;
    v[1] = f32::NAN;
    v[2] = f32::INFINITY;
    HostData::F32(v).to_dtype(dtype)
}

fn bits(h: &HostData) -> Vec<u8> {
    h.as_bytes().to_vec()
}

/// Bitwise equality (NaN != NaN under PartialEq).
fn assert_bitmap_eq(a: &BitmapWeight, b: &BitmapWeight) {
    assert_eq!((a.rows, a.cols, &a.bitmap, &a.row_offsets), (b.rows, b.cols, &b.bitmap, &b.row_offsets));
    assert_eq!(a.values.dtype(), b.values.dtype());
    assert_eq!(bits(&a.values), bits(&b.values));
}

#[test]
fn bitmap_round_trip_is_bit_exact() {
    let mut rng = Rng(0x1234_5678);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (rows, cols) in [(3, 37), (16, 64), (1, 5), (7, 8)] {
            let data = random_data(&mut rng, rows * cols, dtype);
            let keys = prune::magnitude_keys(&data);
            let k = prune::prune_count(0.4, rows * cols);
            let cut = prune::layer_cut(&keys, k).unwrap();
            let (mask, pruned) = prune::unstructured_mask(&keys, rows, cols, cut);
            assert_eq!(pruned, k);
            let w = BitmapWeight::from_dense(&data, rows, cols, &mask).unwrap();
            assert_eq!(w.values.len(), rows * cols - k);
            assert_eq!(*w.row_offsets.last().unwrap() as usize, rows * cols - k);
            let dense = w.to_dense().unwrap();
            // Kept elements keep their exact bits; pruned ones are +0.
            let es = dtype.size_in_bytes();
            for i in 0..rows * cols {
                let (r, c) = (i / cols, i % cols);
                let kept = mask[r * bitmap_row_bytes(cols) + c / 8] >> (c % 8) & 1 == 1;
                let got = &bits(&dense)[i * es..(i + 1) * es];
                if kept {
                    assert_eq!(got, &bits(&data)[i * es..(i + 1) * es]);
                } else {
                    assert!(got.iter().all(|&b| b == 0));
                }
            }
            // Rebuilding from the stored parts gives the same weight.
            let again = BitmapWeight::from_parts(rows, cols, w.bitmap.clone(), w.values.clone()).unwrap();
            assert_bitmap_eq(&again, &w);
        }
    }
}

#[test]
fn sparse24_round_trip_is_bit_exact() {
    let mut rng = Rng(99);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (rows, cols) = (9, 40);
        let data = random_data(&mut rng, rows * cols, dtype);
        let keys = prune::magnitude_keys(&data);
        let mask = prune::sparse24_mask(&keys, rows, cols);
        let w = Sparse24Weight::from_dense(&data, rows, cols, &mask).unwrap();
        w.validate().unwrap();
        assert_eq!(w.values.len(), rows * cols / 2);
        assert_eq!(w.meta.len(), rows * cols / 8);
        let dense = w.to_dense().unwrap();
        let f = dense.to_f32();
        let orig = data.to_f32();
        for g in 0..rows * cols / 4 {
            let zeros = (0..4).filter(|&j| f[4 * g + j] == 0.0 && f[4 * g + j].is_sign_positive()).count();
            assert!(zeros >= 2, "group {g}");
            // NaN (at index 1) sorts above everything, so it is kept.
            if g == 0 {
                assert!(f[1].is_nan());
            }
        }
        // Re-encoding the decoded matrix with the same mask reproduces the same parts.
        let again = Sparse24Weight::from_dense(&dense, rows, cols, &mask).unwrap();
        assert_eq!(bits(&again.values), bits(&w.values));
        assert_eq!(again.meta, w.meta);
        drop(orig);
    }
}

#[test]
fn bad_parts_are_rejected() {
    let data = HostData::F32(vec![1.0; 8]);
    // Three kept in a group of 4.
    assert!(Sparse24Weight::from_dense(&data, 1, 8, &[0b0000_0111]).is_err());
    // Input dimension not a multiple of 4.
    assert!(Sparse24Weight::from_dense(&HostData::F32(vec![1.0; 6]), 1, 6, &[0b11]).is_err());
    // A nibble naming the same position twice.
    let bad = Sparse24Weight { rows: 1, cols: 4, values: HostData::F32(vec![1.0, 2.0]), meta: vec![0b0101] };
    assert!(bad.validate().is_err());
    // Bitmap keeps 3 but 2 values stored; padding bits set.
    assert!(BitmapWeight::from_parts(1, 5, vec![0b0111], HostData::F32(vec![1.0, 2.0])).is_err());
    assert!(BitmapWeight::from_parts(1, 5, vec![0b1000_0011], HostData::F32(vec![1.0, 2.0, 3.0])).is_err());
}

#[test]
fn cuts_prune_exactly_k_with_index_tie_break() {
    let mut rng = Rng(7);
    for n in [1usize, 2, 17, 1000, 4099] {
        // Few distinct keys: many ties.
        let keys: Vec<u32> = (0..n).map(|_| (rng.next() % 5) as u32 * 0x0001_0001).collect();
        for k in [0, 1, n / 3, n / 2, n - 1, n] {
            let cut = prune::layer_cut(&keys, k).unwrap();
            let (mask, pruned) = prune::unstructured_mask(&keys, 1, n, cut);
            assert_eq!(pruned, k);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| (keys[i], i));
            for (rank, &i) in order.iter().enumerate() {
                let kept = mask[i / 8] >> (i % 8) & 1 == 1;
                assert_eq!(kept, rank >= k, "n {n} k {k} i {i}");
            }
        }
    }
    // Global: ties across sets go to the earlier set first.
    let a = vec![5u32, 1, 5];
    let b = vec![5u32, 0, 9];
    let cuts = prune::find_cuts(2, 3, |f| {
        f(0, prune::Keys::Slice(&a));
        f(1, prune::Keys::Slice(&b));
        Ok(())
    })
    .unwrap();
    assert_eq!(cuts[0].1 + cuts[1].1, 3);
    assert_eq!(cuts[0].1, 2); // 1 and the first 5
    assert_eq!(cuts[1].1, 1); // 0
    assert!(prune::layer_cut(&[1u32, 2][..], 3).is_err());
}

#[test]
fn globs() {
    assert!(
        Glob::new("*.ff.net.2.bias").matches("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.bias")
    );
    assert!(Glob::new("conv_?n.*").matches("conv_in.weight"));
    assert!(!Glob::new("conv_in.*").matches("down.conv_in.weight"));
    assert!(Glob::new("*").matches(""));
    assert!(!Glob::new("a*b").matches("acbd"));
}

#[test]
fn written_file_reads_back_identical_and_checksummed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let (rows, cols) = (8, 24);
    // Finite values: loading through the store refuses NaN / inf weights (tests/inputs.rs);
    // the codec's bit-exact round trip of NaN, inf and -0 is tested on the types above.
    let data = random_data(&mut rng, rows * cols, DType::F16).to_f32();
    let data = HostData::F32(data.into_iter().map(|v| if v.is_finite() { v } else { 0.5 }).collect())
        .to_dtype(DType::F16);
    let keys = prune::magnitude_keys(&data);
    let s24 =
        Sparse24Weight::from_dense(&data, rows, cols, &prune::sparse24_mask(&keys, rows, cols)).unwrap();
    let k = prune::prune_count(0.3, rows * cols);
    let (mask, _) = prune::unstructured_mask(&keys, rows, cols, prune::layer_cut(&keys, k).unwrap());
    let bm = BitmapWeight::from_dense(&data, rows, cols, &mask).unwrap();
    let dense_bias = HostData::F32(vec![0.5; rows]);

    let mut header = SparseHeader {
        format_version: sdsparse::format::codec::FORMAT_VERSION,
        component: "unet".into(),
        method: "magnitude".into(),
        scope: "layer".into(),
        seed: 0,
        source: "test".into(),
        layers: BTreeMap::new(),
        kept_dense: BTreeMap::new(),
    };
    let rec = |p: PatternName, pruned: usize, parts: [(&str, &[u8]); 2]| LayerRecord {
        pattern: p,
        shape: vec![rows, cols],
        dtype: "f16".into(),
        pruned: pruned as u64,
        sparsity: pruned as f64 / (rows * cols) as f64,
        crc32: parts.iter().map(|(s, b)| (s.to_string(), crc32_hex(b))).collect(),
    };
    header.layers.insert(
        "a.weight".into(),
        rec(
            PatternName::Sparse24,
            rows * cols / 2,
            [(S24_VALUES, s24.values.as_bytes()), (S24_META, &s24.meta)],
        ),
    );
    header.layers.insert(
        "b.weight".into(),
        rec(PatternName::Unstructured, k, [(BITMAP_MASK, &bm.bitmap), (BITMAP_VALUES, bm.values.as_bytes())]),
    );
    use safetensors::Dtype as D;
    let entries = vec![
        Entry { name: "a.bias".into(), dtype: D::F32, shape: vec![rows] },
        Entry { name: format!("a.weight{S24_VALUES}"), dtype: D::F16, shape: vec![rows, cols / 2] },
        Entry { name: format!("a.weight{S24_META}"), dtype: D::U8, shape: vec![rows, cols / 8] },
        Entry { name: format!("b.weight{BITMAP_MASK}"), dtype: D::U8, shape: vec![rows, cols / 8] },
        Entry { name: format!("b.weight{BITMAP_VALUES}"), dtype: D::F16, shape: vec![bm.values.len()] },
    ];
    std::fs::create_dir(tmp.path().join("unet")).unwrap();
    let path = tmp.path().join("unet/diffusion_pytorch_model.safetensors");
    let meta = header.to_metadata().unwrap();
    let mut w = StreamWriter::create(&path, entries, &meta).unwrap();
    w.write("a.bias", dense_bias.as_bytes()).unwrap();
    w.write(&format!("a.weight{S24_VALUES}"), s24.values.as_bytes()).unwrap();
    w.write(&format!("a.weight{S24_META}"), &s24.meta).unwrap();
    w.write(&format!("b.weight{BITMAP_MASK}"), &bm.bitmap).unwrap();
    assert!(w.write("wrong", &[0u8; 4]).is_err());
    w.write(&format!("b.weight{BITMAP_VALUES}"), bm.values.as_bytes()).unwrap();
    w.finish(&meta).unwrap();
    // The safetensors crate accepts the file.
    let buf = std::fs::read(&path).unwrap();
    safetensors::SafeTensors::deserialize(&buf).unwrap();

    let store = ComponentStore::open(&tmp.path().join("unet")).unwrap();
    assert_eq!(store.logical_names(), vec!["a.bias", "a.weight", "b.weight"]);
    match store.weight("a.weight").unwrap() {
        Weight::Sparse24(got) => {
            assert_eq!((got.rows, got.cols, &got.meta), (s24.rows, s24.cols, &s24.meta));
            assert_eq!(bits(&got.values), bits(&s24.values));
        }
        other => panic!("{}", other.format_name()),
    }
    match store.weight("b.weight").unwrap() {
        Weight::Bitmap(got) => assert_bitmap_eq(&got, &bm),
        other => panic!("{}", other.format_name()),
    }
    assert!(matches!(store.weight("a.bias").unwrap(), Weight::Dense(_)));
    assert!(store.weight("c.weight").is_err());
}
