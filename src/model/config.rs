//! Component configs read from diffusers' config.json files, with named constructors for the real SD2.1 sizes.
