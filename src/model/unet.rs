//! UNet2DConditionModel, SD2 family.
