//! `SparseLinear`, the kernels-only API: 2:4, bitmap and dense weights times activations
//! against an f64 reference of the dense-with-zeros product, on fresh random inputs, on the
//! CPU and on CUDA (skipped without a GPU); norm AND element-wise bounds, NaN never passes.
//! Malformed weights and mismatched shapes are errors, not panics.

use half::f16;
use sdsparse::backend::test_util::{
    check_close, random_bitmap, random_sparse24, TestRng, GPU_ELEM_TOL, GPU_NORM_TOL,
};
use sdsparse::{test_device, DType, Device, HostData, Result, SparseLinear, Tensor, Weight};

/// The f64 product of `x[m, k]` and the dense-with-zeros `w[n, k]` (+ bias). With `f16`, the
/// operands are rounded to f16 first, as the CUDA kernels see them.
fn reference(x: &[f32], w: &Weight, m: usize, bias: Option<&[f32]>, f16_operands: bool) -> Vec<f32> {
    let (n, k) = w.dims2().unwrap();
    let round = |v: f32| if f16_operands { f16::from_f32(v).to_f32() } else { v };
    let dense: Vec<f32> = w.to_dense_host().unwrap().to_f32().into_iter().map(round).collect();
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[j] as f64);
            for c in 0..k {
                acc += round(x[i * k + c]) as f64 * dense[j * k + c] as f64;
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}

/// One product on `device` checked against the reference.
fn check(
    device: &Device,
    w: Weight,
    x_shape: &[usize],
    with_bias: bool,
    rng: &mut TestRng,
    seed: u64,
) -> Result<()> {
    let (n, k) = w.dims2()?;
    let m: usize = x_shape[..x_shape.len() - 1].iter().product();
    let x = rng.vec(m * k);
    let bias = with_bias.then(|| rng.vec(n));
    let layer = SparseLinear::new(w.clone(), device)?;
    assert_eq!((layer.out_features(), layer.in_features()), (n, k));
    let bias_t = bias.as_ref().map(|b| Tensor::from_vec(b.clone(), &[n])).transpose()?;
    let y = layer.forward(&Tensor::from_vec(x.clone(), x_shape)?, bias_t.as_ref())?;
    let mut want_shape = x_shape.to_vec();
    *want_shape.last_mut().unwrap() = n;
    assert_eq!(y.shape(), want_shape);

    let on_gpu = !device.is_cpu();
    let want = reference(&x, &w, m, bias.as_deref(), on_gpu);
    // CPU: f32 accumulation. CUDA: f32 accumulation, f16 output: the kernel tests' bounds.
    let (norm_tol, elem_tol) = if on_gpu { (GPU_NORM_TOL, GPU_ELEM_TOL) } else { (1e-5, 1e-5) };
    if let Err(why) = check_close(&y.to_vec()?, &want, norm_tol, elem_tol) {
        panic!("{} [{m}, {k}] x [{n}, {k}]^T on {} (seed {seed}): {why}", w.format_name(), device.name());
    }
    Ok(())
}

fn sparse_linear_matches_the_reference(device: &Device) -> Result<()> {
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    // 2:4 with leading batch dims and a bias; awkward row counts (not tile multiples).
    for dtype in [DType::F32, DType::F16] {
        let w = random_sparse24(&mut rng, 72, 64, dtype);
        check(device, Weight::Sparse24(w), &[2, 5, 64], true, &mut rng, seed)?;
    }
    // Unstructured at a few densities, without and with a bias.
    for (density, bias) in [(0.65, false), (0.3, true), (1.0, true)] {
        let w = random_bitmap(&mut rng, 40, 96, density, DType::BF16);
        check(device, Weight::Bitmap(w), &[7, 96], bias, &mut rng, seed)?;
    }
    if device.is_cpu() {
        // Dense weights (CPU only) and in_features not a multiple of 8.
        let dense = Tensor::from_vec(rng.vec(9 * 13), &[9, 13])?;
        check(device, Weight::Dense(dense), &[3, 13], true, &mut rng, seed)?;
        let w = random_bitmap(&mut rng, 9, 13, 0.5, DType::F32);
        check(device, Weight::Bitmap(w), &[4, 13], false, &mut rng, seed)?;
    }
    Ok(())
}
test_device!(sparse_linear_matches_the_reference);

#[test]
fn bad_weights_and_shapes_are_errors() -> Result<()> {
    let mut rng = TestRng::new(1);
    let cpu = Device::Cpu;
    let w = random_bitmap(&mut rng, 8, 16, 0.5, DType::F32);
    let layer = SparseLinear::new(Weight::Bitmap(w.clone()), &cpu)?;
    let e = layer.forward(&Tensor::zeros(&[3, 15]), None).unwrap_err().to_string();
    assert!(e.contains("16 input features"), "{e}");
    let e = layer.forward(&Tensor::zeros(&[3, 16]), Some(&Tensor::zeros(&[7]))).unwrap_err().to_string();
    assert!(e.contains("bias"), "{e}");

    let mut bad = w.clone();
    bad.row_offsets[3] += 1;
    let e = SparseLinear::new(Weight::Bitmap(bad), &cpu).err().expect("corrupt offsets rejected").to_string();
    assert!(e.contains("row"), "{e}");
    let mut bad = w;
    bad.values = HostData::F32(vec![1.0]);
    assert!(SparseLinear::new(Weight::Bitmap(bad), &cpu).is_err());

    let mut s = random_sparse24(&mut rng, 8, 16, DType::F16);
    s.meta.pop();
    assert!(SparseLinear::new(Weight::Sparse24(s), &cpu).is_err());
    Ok(())
}
