//! Deviation of a pruned model's output from the dense model's on the same prompt and seed:
//! the measures `sdsparse sweep` reports for every model (no reference model needed).
//!
//! - latent relative error: `||z_pruned - z_dense||_2 / ||z_dense||_2` of the final latents
//!   (before VAE decoding);
//! - PSNR of the 8-bit RGB images, `10 log10(255^2 / MSE)` in dB over all pixels and channels
//!   (`f64::INFINITY` for identical images);
//! - SSIM of the 8-bit RGB images: the `image-compare` crate's `MSSIMSimple` (SSIM over 8x8
//!   windows, averaged; computed per channel, the minimum of the three), 1 for identical images.

use crate::error::{Error, Result};
use crate::Tensor;

/// `||a - b|| / ||b||` over all elements (errors on different shapes; 0 when both are zero).
pub fn latent_relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!("latents {:?} and {:?} differ in shape", a.shape(), b.shape())));
    }
    let (a, b) = (a.as_slice()?, b.as_slice()?);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    Ok(if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    })
}

fn check_same(a: &[u8], b: &[u8], width: usize, height: usize) -> Result<()> {
    if a.len() != 3 * width * height || b.len() != a.len() {
        return Err(Error::Shape(format!(
            "images must both be {width}x{height} RGB8 ({} bytes), got {} and {}",
            3 * width * height,
            a.len(),
            b.len()
        )));
    }
    Ok(())
}

/// PSNR in dB of two interleaved RGB8 images of `width x height`.
pub fn psnr(a: &[u8], b: &[u8], width: usize, height: usize) -> Result<f64> {
    check_same(a, b, width, height)?;
    let se: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let mse = se / a.len() as f64;
    Ok(if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() })
}

/// SSIM of two interleaved RGB8 images (see the module documentation).
pub fn ssim(a: &[u8], b: &[u8], width: usize, height: usize) -> Result<f64> {
    check_same(a, b, width, height)?;
    let img = |x: &[u8]| {
        image::RgbImage::from_raw(width as u32, height as u32, x.to_vec())
            .ok_or_else(|| Error::Shape("SSIM: bad image buffer".into()))
    };
    let s =
        image_compare::rgb_similarity_structure(&image_compare::Algorithm::MSSIMSimple, &img(a)?, &img(b)?)
            .map_err(|e| Error::Msg(format!("SSIM: {e}")))?;
    Ok(s.score)
}
