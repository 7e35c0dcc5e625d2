//! A Rust program using sdsparse as a library: load a pipeline, generate one image, save it.
//!
//! ```sh
//! cargo run --release --example generate -- tests/fixtures/tiny-sd2-eps out.png "a red cube" 10
//! ```
//!
//! In your own crate: `sdsparse = { git = "...", version = "0.1" }` in `[dependencies]`, then
//! the same code (`docs/API.md` lists what is stable).

use sdsparse::{Device, GenerateRequest, StableDiffusion};
use std::path::PathBuf;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model) = args.first().map(PathBuf::from) else {
        eprintln!("usage: generate MODEL_DIR [OUT.png] [PROMPT] [STEPS]");
        std::process::exit(2);
    };
    let out = PathBuf::from(args.get(1).map_or("out.png", String::as_str));
    let prompt = args.get(2).map_or("a photograph of an astronaut riding a horse", String::as_str);
    let steps = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(25);

    let sd = StableDiffusion::load(&model, &Device::Cpu)?;
    let mut req = GenerateRequest::new(prompt);
    req.steps = steps;
    let generated = sd.generate(&req, &mut |done, total| eprint!("\rUNet call {done}/{total}"))?;
    eprintln!();

    let image = generated.to_rgb8()?;
    image::save_buffer(&out, &image.pixels, image.width as u32, image.height as u32, image::ColorType::Rgb8)?;

    let t = &generated.timings;
    let unet: Duration = t.unet_steps.iter().sum();
    println!(
        "wrote {} ({}x{}, {}): text encoder {:?}, UNet {:?} over {} calls, VAE {:?}; final latents {:?}",
        out.display(),
        image.width,
        image.height,
        generated.scheduler,
        t.text_encoder,
        unet,
        t.unet_steps.len(),
        t.vae,
        generated.latents.shape()
    );
    Ok(())
}
