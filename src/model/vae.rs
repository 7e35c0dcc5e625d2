//! AutoencoderKL decoder (latents → image).
