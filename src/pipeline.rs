//! The text-to-image pipeline: prompt → embeddings → denoising loop with CFG → VAE → image.
